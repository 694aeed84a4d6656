"""Shared fixtures: tiny model pools on disk, built once per session, and a quiet environment."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hub_helpers import READ_TOKEN, WRITE_TOKEN, publish  # noqa: E402
from hub_server import HubState, LoopbackHub  # noqa: E402

# The loopback Hub must be up, and the Hub client pointed at it, before anything imports huggingface_hub.
HUB = LoopbackHub(HubState()).start()
_HF_HOME = tempfile.mkdtemp(prefix="hf-fusion-tests-home-")
atexit.register(shutil.rmtree, _HF_HOME, True)
for _key in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE"):
    os.environ.pop(_key, None)
os.environ.update(
    HF_ENDPOINT=HUB.endpoint,
    HF_HOME=_HF_HOME,
    HF_HUB_DISABLE_TELEMETRY="1",
    HF_HUB_DISABLE_XET="1",
    HF_HUB_DISABLE_PROGRESS_BARS="1",
    HF_HUB_ETAG_TIMEOUT="5",
    HF_HUB_DOWNLOAD_TIMEOUT="5",
    TRANSFORMERS_VERBOSITY="error",
    GRADIO_ANALYTICS_ENABLED="False",
)

import torch  # noqa: E402
from toy import make_pool  # noqa: E402


@pytest.fixture(scope="session")
def pools(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[Path]]]:
    """One base and three experts per architecture (float32 safetensors)."""
    root = tmp_path_factory.mktemp("pools")
    return {arch: make_pool(root, arch, 3, seed=i) for i, arch in enumerate(["bert", "gpt2", "clip_vision"])}


@pytest.fixture(scope="session")
def hub() -> LoopbackHub:
    """The session's loopback Hub; HF_ENDPOINT points at it for every client in this process and its children."""
    return HUB


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    HUB.stop()


@pytest.fixture(scope="session")
def bert_pool(pools: dict[str, tuple[Path, list[Path]]]) -> tuple[Path, list[Path]]:
    return pools["bert"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokens(hub: LoopbackHub) -> dict[str, str]:
    hub.state.add_token(WRITE_TOKEN, "alice")
    hub.state.add_token(READ_TOKEN, "alice", write=False)
    return {"write": WRITE_TOKEN, "read": READ_TOKEN}


@pytest.fixture(scope="session")
def hub_pool(hub: LoopbackHub, bert_pool: tuple[Path, list[Path]]) -> dict[str, object]:
    """The BERT pool as public repos under `fusion-lab`, all Apache-2.0; commits recorded."""
    base, experts = bert_pool
    commits = {"fusion-lab/bert-base": publish(hub, "fusion-lab/bert-base", base, license="apache-2.0")}
    names = []
    for i, folder in enumerate(experts):
        name = f"fusion-lab/bert-ft{i}"
        commits[name] = publish(hub, name, folder, license="apache-2.0")
        names.append(name)
    return {"base": "fusion-lab/bert-base", "experts": names, "commits": commits, "local": (base, experts)}


@pytest.fixture
def repo_name() -> str:
    return f"alice/fused-{uuid.uuid4().hex[:8]}"


@pytest.fixture(autouse=True)
def own_score_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test starts with an empty score cache, so no test depends on what another scored before it."""
    folder = tmp_path_factory.mktemp("hf-fusion-cache")
    monkeypatch.setenv("HF_FUSION_CACHE", str(folder))
    return folder
