"""Runs the CLI under several processes on the CPU (torchrun with gloo), as users do with accelerate launch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import hf_fusion

REPO = Path(hf_fusion.__file__).resolve().parents[1]


def run_cli(
    args: list[str], *, processes: int = 1, env: dict[str, str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess[str]:
    """``hf-fusion ARGS`` in ``processes`` processes (one: a plain run, no launcher), one thread each, with the
    test session's environment plus ``env``. torchrun's ``--standalone`` rendezvous takes a free port itself, so
    runs never race for one."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        **(env or {}),
    }
    command = [sys.executable, "-m", "hf_fusion", *args]
    if processes > 1:
        command[1:2] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
