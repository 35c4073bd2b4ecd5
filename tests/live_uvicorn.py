"""Run a real uvicorn server in a thread for a test (loopback only), and stop it afterwards."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn


@contextmanager
def serving(config: uvicorn.Config, sock: socket.socket | None = None, start_timeout_s: float = 30.0,
            stop_timeout_s: float = 15.0) -> Iterator[uvicorn.Server]:
    """Start ``config`` (on ``sock`` if given) in a daemon thread, wait until it accepts, yield, then stop it."""
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]} if sock is not None else {},
                              daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(stop_timeout_s)
