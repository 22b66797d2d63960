"""A real `prefect server start` for tests, and the process helpers around it (imported by test modules).

The server listens on 127.0.0.1 and a free port, with its own PREFECT_HOME (so its own database); processes are
started in their own session so that stopping one also stops its children.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

SERVER_START_S = 120


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = 40) -> str:
    """The last `lines` lines of a log file, or "(no log)"."""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


def start_logged(command: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
    """Start `command` in its own session (so that `stop` reaches its children), stdout and stderr to `log`."""
    with log.open("w") as out:
        return subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    """Stop a process started in its own session, and its children: SIGTERM, then SIGKILL after 15 s."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def running_server(home: Path) -> Iterator[dict[str, str]]:
    """A real `prefect server start` with PREFECT_HOME `home`, healthy; yields the environment that talks to it.

    Yields {"env": environment for clients (this process's plus the server's settings), "api": API URL, "ui": UI
    URL}; the server's log is `home/server.log`. The server and its children are stopped on exit.
    """
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api, "PREFECT_UI_API_URL": api,
           "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(port),
           "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    log = home / "server.log"
    server = start_logged([sys.executable, "-m", "prefect", "server", "start"], env, log)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"prefect server exited with {server.returncode}; its log:\n{tail(log)}")
            try:
                if httpx.get(f"{api}/health", timeout=2).json() is True:
                    break
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prefect server on port {port} not healthy after {SERVER_START_S} s; log:\n{tail(log)}")
            time.sleep(0.5)
        yield {"env": env, "api": api, "ui": f"http://127.0.0.1:{port}"}
    finally:
        stop(server)
