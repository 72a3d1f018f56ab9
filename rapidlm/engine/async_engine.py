"""The engine for a server: EngineCore stepping in one thread, requests streamed to asyncio callers.

The stepping thread owns the core: requests and aborts reach it as commands on a queue, applied between steps,
so the core itself needs no locks. Outputs go back to each request's asyncio.Queue through its event loop's
call_soon_threadsafe. Model compute releases the GIL, so the event loop keeps serving HTTP meanwhile.

Which thread steps matters on the CPU: PyTorch's OpenMP parallel regions (every matmul and rapidlm's C++
kernels) started from a thread other than the main one ran 3-9x slower per call here (an int4 decode matmul
36 -> 118 us, a 64x64 mm 18 -> 167 us; 2 cores, libgomp), which made a whole decode step ~2x slower. So the
server calls `run_forever()` on the main thread and runs the event loop in another; `start()` (a background
stepping thread) is for tests and notebooks.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from rapidlm.engine.llm_engine import EngineConfig, EngineCore
from rapidlm.engine.outputs import EngineOutput, EngineStats
from rapidlm.engine.sampling import SamplingParams
from rapidlm.errors import EngineFullError, EngineStoppedError

log = logging.getLogger("rapidlm.engine")

__all__ = ["AsyncEngine", "EngineConfig"]


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


class AsyncEngine:
    def __init__(self, llm, config: EngineConfig | None = None) -> None:  # noqa: ANN001 - rapidlm.LLM
        self.core = EngineCore(llm.runner, llm.tokenizer, config or EngineConfig())
        self.config = self.core.config
        self._commands: list[Callable[[], None]] = []
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._stopping = False
        self._running = False
        self.last_step_time = 0.0

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def ready(self) -> bool:
        """The model is loaded and the step loop is running."""
        return self._running and not self._closed

    @property
    def stopping(self) -> bool:
        return self._stopping

    def start(self) -> None:
        """Step in a background thread (tests, notebooks; see the module docstring for why a server doesn't)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="rapidlm-engine", daemon=True)
            self._thread.start()

    def run_forever(self) -> None:
        """Step in the calling thread (the main one, for speed) until shutdown() is called from elsewhere."""
        self._loop()

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        self.core.check_request(prompt_ids, params)

    async def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
    ) -> AsyncIterator[EngineOutput]:
        """Stream a request's outputs. Closing the iterator early aborts it and frees its KV blocks."""
        if self._stopping or self._closed:
            raise EngineStoppedError("the server is shutting down and admits no new requests")
        self.core.check_request(prompt_ids, params)
        stream = _Stream(asyncio.get_running_loop())
        limit = self.config.max_running + self.config.max_queued
        with self._lock:
            if len(self._streams) >= limit:
                raise EngineFullError(f"the server is at capacity ({limit} requests running or queued); retry later")
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
            self._commands.append(lambda: self._add(request_id, prompt_ids, params, logprobs, prompt_logprobs))
        self._wake.set()
        finished = False
        try:
            while True:
                out: EngineOutput | BaseException = await stream.queue.get()
                if isinstance(out, BaseException):
                    finished = True
                    raise out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._commands.append(lambda: self._deliver(self.core.abort(request_id)))
        self._wake.set()

    def stats(self) -> EngineStats:
        return self.core.stats()

    @property
    def num_requests(self) -> int:
        return len(self._streams)

    async def drain(self, timeout: float) -> None:
        """Stop admitting; let running and queued requests finish for up to `timeout` s; abort the rest."""
        self._stopping = True
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._streams:
            with self._lock:
                self._commands.append(lambda: self._deliver_all(self.core.abort_all("the server shut down first")))
            self._wake.set()
            end = time.monotonic() + 5.0
            while self._streams and time.monotonic() < end:
                await asyncio.sleep(0.02)

    def shutdown(self) -> None:
        self._closed = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    # ---- the engine thread ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        self._running = True
        try:
            self._step_until_closed()
        finally:
            self._running = False

    def _step_until_closed(self) -> None:
        while not self._closed:
            self._wake.clear()
            with self._lock:
                commands, self._commands = self._commands, []
            for command in commands:
                command()
            if not self.core.has_unfinished:
                self._wake.wait(timeout=0.5)
                continue
            try:
                outputs = self.core.step()
            except Exception as exc:  # an engine bug must not hang clients: end every request with the error
                log.exception("engine step failed")
                self._deliver_all(self.core.abort_all(f"internal engine error: {type(exc).__name__}: {exc}"))
                continue
            self.last_step_time = time.monotonic()
            self._deliver_all(outputs)
        self._deliver_all(self.core.abort_all("the engine stopped"))

    def _add(self, request_id, prompt_ids, params, logprobs, prompt_logprobs) -> None:  # noqa: ANN001
        try:
            self.core.add_request(request_id, prompt_ids, params, logprobs, prompt_logprobs)
        except Exception as exc:  # noqa: BLE001 - handed to the caller, who raises it
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, exc)

    def _deliver_all(self, outputs: list[EngineOutput]) -> None:
        # One wake-up per event loop per step, not one per output: each call_soon_threadsafe writes to the loop's
        # self-pipe and the loop's thread takes the GIL to handle it, which the stepping thread then waits for.
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, EngineOutput]]] = {}
        with self._lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue
                if out.finished:
                    del self._streams[out.request_id]
                batches.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the callers' loop is closed: nobody is listening any more
                pass

    def _deliver(self, out: EngineOutput | None) -> None:
        if out is not None:
            self._deliver_all([out])


def _put_all(items: list[tuple[asyncio.Queue, EngineOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)
