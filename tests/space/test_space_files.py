"""spaces/ deploys as a Hugging Face Space: valid metadata, requirements in step with the package, and a deployed
copy (pushed to the loopback Hub and downloaded again) that starts and merges on its own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from huggingface_hub import SpaceCard, snapshot_download

ROOT = Path(__file__).resolve().parents[2]
SPACE = ROOT / "spaces"


def test_space_metadata() -> None:
    import gradio

    card = SpaceCard.load(SPACE / "README.md")
    data = card.data
    assert data.sdk == "gradio" and (SPACE / data.app_file).is_file()
    assert data.sdk_version.split(".")[0] == gradio.__version__.split(".")[0]
    assert re.fullmatch(r"\d+\.\d+\.\d+", data.sdk_version)
    assert data.get("hf_oauth") is True
    assert {"read-repos", "write-repos", "manage-repos"} <= set(data.get("hf_oauth_scopes"))
    assert data.license == "apache-2.0"


def _names(requirements: list[str]) -> dict[str, str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower().replace("_", "-"): r for r in requirements}


def test_space_requirements_match_the_package() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["demo"]
    listed = [
        line.strip()
        for line in (SPACE / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert _names(listed) == _names(wanted)


@pytest.mark.slow
def test_deployed_space_starts_from_its_own_files(hub, tokens, tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    from deploy_space import deploy
    from gradio_client import Client

    from hf_fusion.space import free_port

    url = deploy("alice/hf-fusion-space", token=tokens["write"])
    assert url.endswith("alice/hf-fusion-space")
    local = Path(
        snapshot_download(
            "alice/hf-fusion-space", repo_type="space", local_dir=tmp_path / "space", token=tokens["write"]
        )
    )
    assert {
        "app.py",
        "README.md",
        "requirements.txt",
        "hf_fusion/__init__.py",
        "hf_fusion/model_cards/fused_model.md.j2",
    } <= {p.relative_to(local).as_posix() for p in local.rglob("*")}
    port = free_port()
    script = (
        "import runpy, sys\n"
        "namespace = runpy.run_path('app.py', run_name='deployed')\n"
        "import hf_fusion\n"
        "print('PACKAGE', hf_fusion.__file__, flush=True)\n"
        f"namespace['demo'].launch(server_name='127.0.0.1', server_port={port}, prevent_thread_lock=True, quiet=True,"
        " ssr_mode=False)\n"
        "print('READY', flush=True)\n"
        "sys.stdin.read()\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=local,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        lines = []
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if line.startswith("READY"):
                break
        package = next(line.split(" ", 1)[1].strip() for line in lines if line.startswith("PACKAGE"))
        assert Path(package).resolve().is_relative_to(local.resolve())  # the deployed copy, not the installed one
        client = Client(f"http://127.0.0.1:{port}", verbose=False, download_files=False, analytics_enabled=False)
        status, _, _, _, card = client.predict(
            "method: task_arithmetic\npool: minilm-text3\n", False, 0, api_name="/merge"
        )
        assert "Merged 3 models with **task_arithmetic**" in status
        assert "task_arithmetic" in card  # the card template travelled with the package
    finally:
        proc.kill()
        proc.wait(10)
