"""Run a throwaway ``redis-server`` on loopback for tests and benchmarks.

Use :func:`redis_server` as a context manager (the session fixture in
``test_budget.py`` wraps it). Nothing is persisted; the server dies with the block.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

REDIS_SERVER = "redis-server"


def available() -> bool:
    return shutil.which(REDIS_SERVER) is not None


def _free_port() -> int:
    # redis-server refuses --port 0, so borrow a free port from the kernel
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@contextmanager
def redis_server(startup_timeout: float = 10.0) -> Iterator[str]:
    """Start ``redis-server`` on a free loopback port; yield ``redis://127.0.0.1:<port>/0``."""
    exe = shutil.which(REDIS_SERVER)
    if exe is None:
        raise RuntimeError(f"{REDIS_SERVER} is not on PATH")
    with tempfile.TemporaryDirectory(prefix="llmbench-redis-") as tmp:
        for _attempt in range(3):  # the port may be taken between probe and bind
            port = _free_port()
            proc = subprocess.Popen(
                [
                    exe,
                    "--port", str(port),
                    "--bind", "127.0.0.1",
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", tmp,
                    "--logfile", "redis.log",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                deadline = time.monotonic() + startup_timeout
                while proc.poll() is None and time.monotonic() < deadline:
                    if _answers_ping(port):
                        break
                    time.sleep(0.02)
                else:
                    continue
                yield f"redis://127.0.0.1:{port}/0"
                return
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        raise RuntimeError(f"{REDIS_SERVER} did not answer PING within {startup_timeout} s")
