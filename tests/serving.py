"""A real uvicorn server on 127.0.0.1 around an app, for the server test modules:

    with running_server(lm, ServerSettings(...)) as server:   # server.url, server.lm, server.http
        ...
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import httpx
import uvicorn

from riverllm.server import ServerSettings, create_app
from riverllm.server.app import uvicorn_config


@contextmanager
def running_server(lm, settings: ServerSettings) -> Iterator[SimpleNamespace]:
    app = create_app(lm, settings)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    uvicorn_server = uvicorn.Server(uvicorn_config(app, settings, log_level="warning"))  # serve's own limits
    thread = threading.Thread(target=uvicorn_server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not uvicorn_server.started and time.time() < deadline:
        time.sleep(0.05)
    assert uvicorn_server.started
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    http = httpx.Client(base_url=url, timeout=120, headers=headers)
    try:
        yield SimpleNamespace(url=url, lm=lm, http=http, app=app)
    finally:
        http.close()
        uvicorn_server.should_exit = True
        thread.join(60)
        listener.close()


def metrics(server) -> dict[str, float]:
    text = server.http.get("/metrics").text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line.startswith("riverllm_") and "{" not in line}


def wait_idle(server, timeout: float = 60) -> dict[str, float]:
    """Wait until the worker has nothing running or waiting (a cancelled job leaves at its next step)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        current = metrics(server)
        if current["riverllm_running"] == 0 and current["riverllm_queue_length"] == 0:
            return current
        time.sleep(0.1)
    raise AssertionError("the server's worker did not become idle")
