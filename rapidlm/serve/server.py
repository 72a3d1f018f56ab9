"""Run the app under uvicorn, with a graceful drain on SIGTERM (and on the first Ctrl-C).

Shutdown order: stop admitting (503 for new requests, /ready 503) → wait for running requests up to
drain_timeout → the engine aborts what is left (their clients get an error, never a hang) → uvicorn closes
its connections → the engine stops → exit code 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import threading
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from rapidlm.serve.app import create_app, drain
from rapidlm.serve.config import ServerConfig

log = logging.getLogger("rapidlm.serve")

_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
# Once the engine has drained, every response is complete or errored; this only bounds the last writes.
_CLOSE_TIMEOUT_S = 5.0


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose exit signal drains the app first instead of closing connections at once."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout: float, banner: str = "") -> None:
        super().__init__(config)
        self.app = app
        self.drain_timeout = drain_timeout
        self.banner = banner
        self.bound: tuple[str, int] | None = None
        self._drain_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.started and self.servers and self.servers[0].sockets:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.bound = (host, port)
            # One stable line on stdout (uvicorn logs to stderr): what scripts and tests wait for, with the
            # real port when --port 0 let the OS pick one.
            print(f"rapidlm: serving {self.banner} on http://{host}:{port}", flush=True)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in the main thread between bytecodes of the event loop's thread (the same thread): only
        # schedule work. The signal is not recorded, so uvicorn does not re-raise it after shutdown and the
        # process exits 0 after a clean drain.
        if self._drain_task is None and self._loop is not None and not self.should_exit:
            self._loop.call_soon_threadsafe(self._start_drain)
        elif sig == signal.SIGINT:  # a second Ctrl-C: stop waiting
            self.force_exit = True
            self.should_exit = True

    def _start_drain(self) -> None:
        if self._drain_task is None:
            log.info("shutdown requested: draining (up to %.1f s)", self.drain_timeout)
            self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            await drain(self.app, self.drain_timeout)
        except Exception:  # noqa: BLE001 - exit anyway; a failed drain must not keep the process up
            log.exception("drain failed")
        self.should_exit = True


def build_server(engine: Any, tokenizer: Any, model_name: str, config: ServerConfig) -> DrainingServer:
    app = create_app(engine, tokenizer, model_name, config)
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        lifespan="off",  # the engine's lifetime is the caller's, not the app's
        timeout_graceful_shutdown=_CLOSE_TIMEOUT_S,
        timeout_keep_alive=5,
    )
    return DrainingServer(uv_config, app, config.drain_timeout, banner=model_name)


def serve(llm: Any, model_name: str, config: ServerConfig, engine_config: Any) -> int:
    """Start an AsyncEngine over `llm`, serve until SIGTERM/Ctrl-C, drain, stop. Returns the exit code."""
    from rapidlm.engine.async_engine import AsyncEngine

    if config.api_key is None and config.host not in _LOOPBACK:
        print(
            f"rapidlm: warning: serving on {config.host} without an API key: anyone who can reach this port can "
            "use the model (pass --api-key-file)",
            file=sys.stderr,
        )
    engine = AsyncEngine(llm, engine_config)
    server = build_server(engine, llm.tokenizer, model_name, config)

    # The engine steps on this (the main) thread, where PyTorch's OpenMP kernels run at full speed (see
    # rapidlm.engine.async_engine); uvicorn's event loop runs in a second thread. Signals arrive on the main
    # thread, so the handlers are installed here and hand over to the server, which drains and then stops.
    def run_http() -> None:
        try:
            server.run()
        finally:
            engine.shutdown()  # ends run_forever() below

    def on_signal(sig: int, frame: FrameType | None) -> None:
        server.handle_exit(sig, frame)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    http = threading.Thread(target=run_http, name="rapidlm-http", daemon=True)
    http.start()
    try:
        engine.run_forever()
    finally:
        engine.shutdown()
        server.should_exit = True
        http.join(timeout=_CLOSE_TIMEOUT_S + 5)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:  # e.g. the port was taken: uvicorn logged why
        print("rapidlm: error: the server could not start", file=sys.stderr)
        return 1
    return 0
