"""Runs the CLI under several processes on the CPU (torchrun with gloo), as users do with accelerate launch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_cli(
    args: list[str], *, processes: int = 1, env: dict[str, str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """``hf-fusion ARGS`` in ``processes`` processes (one: a plain run, no launcher), one thread each, with the
    test session's environment plus ``env``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if processes == 1:
        command = [sys.executable, "-m", "hf_fusion", *args]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={processes}",
            f"--master_port={free_port()}",
            "-m",
            "hf_fusion",
            *args,
        ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
