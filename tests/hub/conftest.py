"""Hub fixtures: a tiny pool published on the loopback Hub, and tokens for a writer and a read-only reader."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from hub_helpers import READ_TOKEN, WRITE_TOKEN, publish
from hub_server import LoopbackHub


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
