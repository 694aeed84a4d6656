"""Helpers for the Hub tests: token values and publishing folders to the loopback Hub."""

from __future__ import annotations

from pathlib import Path

from hub_server import LoopbackHub

WRITE_TOKEN = "hf_alice_write_" + "x7Qz" * 6
READ_TOKEN = "hf_alice_read_" + "k3Pw" * 6


def publish(
    hub: LoopbackHub,
    repo_id: str,
    folder: Path,
    *,
    license: str | None = None,
    private: bool = False,
    gated: bool = False,
) -> str:
    """Creates ``repo_id`` on the loopback Hub with the files of ``folder`` (and a card); returns the commit."""
    hub.state.create(repo_id, private=private, gated=gated)
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    if license:
        files["README.md"] = f"---\nlicense: {license}\n---\n# {repo_id}\n".encode()
    return hub.state.upload(repo_id, files, title="upload model")
