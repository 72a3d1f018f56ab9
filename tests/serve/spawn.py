"""Run `rapidlm serve` as a real subprocess for end-to-end tests: free port, wait for /ready, stop it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
_BANNER = re.compile(r"rapidlm: serving .* on (http://\S+)")
START_TIMEOUT_S = 120.0  # loading the model on 2 busy cores


class SpawnedServer:
    def __init__(self, args: list[str], api_key: str | None = None) -> None:
        self.api_key = api_key
        self.lines: list[str] = []
        self._url: str | None = None
        self._seen = threading.Event()
        cmd = [sys.executable, "-m", "rapidlm.cli", "serve", "--port", "0", "--log-level", "warning", *args]
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        # Drain the pipe in a thread: a full pipe would block the server; the lines help when a test fails.
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            m = _BANNER.search(line)
            if m and self._url is None:
                self._url = m.group(1)
                self._seen.set()
        self._seen.set()

    @property
    def log(self) -> str:
        return "\n".join(self.lines[-60:])

    @property
    def url(self) -> str:
        assert self._url is not None, f"server did not start:\n{self.log}"
        return self._url

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> SpawnedServer:
        deadline = time.monotonic() + timeout
        if not self._seen.wait(timeout):
            self.stop()
            raise TimeoutError(f"no start-up line within {timeout:.0f} s:\n{self.log}")
        if self._url is None:
            raise RuntimeError(f"server exited with {self.proc.wait()}:\n{self.log}")
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log}")
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"/ready not 200 within {timeout:.0f} s:\n{self.log}")

    def metric(self, name: str) -> float:
        """One unlabelled sample from /metrics (or a labelled one: name='x{a="b"}')."""
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        raise KeyError(name)

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited within `timeout`. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        return self.proc.returncode
