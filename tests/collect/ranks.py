"""Launch one subprocess per rank of a gloo process group and collect their results (no hang)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch_ranks(worker, args_of_rank, world: int, timeout: int, what: str) -> list[tuple[int, str, str]]:
    """Start ``world`` ranks of ``worker`` (``args_of_rank(rank, port)`` → argv tail); (returncode, stdout,
    stderr) per rank. A rank that does not finish within ``timeout`` s kills them all and fails the test."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), *args_of_rank(r, port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in range(world)
    ]
    out = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{what}: a rank hung for {timeout} s")
        out.append((p.returncode, o, e))
    return out
