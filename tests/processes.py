"""Stopping the server processes of a test deployment (tests/cluster.py, tests/sentinel.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def stop_all(procs: list[subprocess.Popen[bytes]], grace: float = 5.0) -> None:
    """Terminate every process, kill what has not exited after ``grace`` seconds, and
    empty ``procs``."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace)
    procs.clear()


def log_tails(paths: list[Path], root: Path, size: int = 2000) -> str:
    """The last ``size`` characters of each log (for a failing test's message)."""
    return "\n".join(f"--- {p.relative_to(root)}\n{p.read_text(errors='replace')[-size:]}"
                     for p in sorted(paths))
