"""The wheel users install: every package and data file of the source tree is in it, and its CLI runs on its own.

An editable install reads the source tree, so it hides a package or a data file the wheel leaves out; this test
builds the wheel from a copy of the tracked tree, installs it into a folder of its own, and runs the CLI from
there with the source tree off the import path.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PACKAGED = ("hf_fusion/",)


def _source_files() -> list[str]:
    """Tracked and new (not ignored) files of the package tree, as a fresh checkout has them."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", *PACKAGED],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if listed.returncode != 0:
        pytest.skip("not a git checkout: the packaged file list comes from git")
    return sorted({f for f in listed.stdout.splitlines() if (ROOT / f).exists()})


def _expected_in_wheel(files: list[str]) -> set[str]:
    """Where each source file lands: at its own path, symbolic links left out."""
    return {name for name in files if not (ROOT / name).is_symlink()}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    files = _source_files()
    tree = tmp_path_factory.mktemp("tree")
    for name in [*files, "pyproject.toml", "README.md"]:
        dest = tree / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_symlink():
            dest.symlink_to(os.readlink(ROOT / name))
        else:
            shutil.copy2(ROOT / name, dest)
    out = tmp_path_factory.mktemp("dist")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(tree), "-w", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr
    (path,) = out.glob("hf_fusion-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh environment holding the wheel, which sees this environment's dependencies but not its .pth hooks.

    Its site-packages lists ours as a plain path: the editable install's finder (a .pth hook) is not run there,
    so nothing can fall back to the source tree.
    """
    env = tmp_path_factory.mktemp("env")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    ours = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (theirs,) = (env / "lib").glob("python3*/site-packages")
    (theirs / "dependencies.pth").write_text("\n".join(ours) + "\n")
    # --ignore-installed: without it pip would first uninstall this environment's own (editable) hf-fusion
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--ignore-installed",
            "-q",
            "--prefix",
            str(env),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return env


def test_wheel_holds_every_package_and_data_file(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = _expected_in_wheel(_source_files()) - names
    assert not missing, f"left out of the wheel: {sorted(missing)}"
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def _run_installed(env: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The wheel's own ``hf-fusion`` script, run by the fresh environment's interpreter."""
    variables = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    variables.update(HF_HUB_OFFLINE="1")
    return subprocess.run(
        [str(env / "bin" / "python"), *args], cwd=cwd, env=variables, capture_output=True, text=True, timeout=900
    )


def test_cli_from_the_wheel_lists_methods_and_merges_the_builtin_pool(installed: Path, tmp_path: Path) -> None:
    where = _run_installed(
        installed, tmp_path, "-c", "import hf_fusion.models, hf_fusion.modelwise, hf_fusion; print(hf_fusion.__file__)"
    )
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(installed)

    script = str(installed / "bin" / "hf-fusion")
    methods = _run_installed(installed, tmp_path, script, "methods")
    assert methods.returncode == 0, methods.stderr
    assert "ties_merging" in methods.stdout and "regmean" in methods.stdout

    merged = _run_installed(
        installed,
        tmp_path,
        script,
        "merge",
        "--pool",
        "minilm-text3",
        "--method",
        "ties_merging",
        "--output",
        str(tmp_path / "m"),
        "--quiet",
    )
    assert merged.returncode == 0, merged.stderr
    files = set(os.listdir(tmp_path / "m"))
    assert {"model.safetensors", "config.json", "README.md", "fusion_recipe.yaml"} <= files
