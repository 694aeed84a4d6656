"""Hub fixtures: a tiny pool published on the loopback Hub, and tokens for a writer and a read-only reader."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from hub_server import LoopbackHub

WRITE_TOKEN = "hf_alice_write_" + "x7Qz" * 6
READ_TOKEN = "hf_alice_read_" + "k3Pw" * 6


def publish(hub: LoopbackHub, repo_id: str, folder: Path, *, license: str | None = None, private: bool = False,
            gated: bool = False) -> str:
    """Creates ``repo_id`` on the loopback Hub with the files of ``folder`` (and a card); returns the commit."""
    hub.state.create(repo_id, private=private, gated=gated)
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    if license:
        files["README.md"] = f"---\nlicense: {license}\n---\n# {repo_id}\n".encode()
    return hub.state.upload(repo_id, files, title="upload model")


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
