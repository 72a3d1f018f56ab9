"""ServerConfig: the HTTP server's settings (the engine's own live in rapidlm.engine.async_engine.EngineConfig)."""

from __future__ import annotations

from dataclasses import dataclass

from rapidlm.errors import ConfigError

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # loopback by default: exposing a model to a network is a decision to make on purpose
    port: int = 8000  # 0 = any free port (the bound address is printed at start-up)
    api_key: str | None = None  # None = no authentication
    max_body_bytes: int = 4 * 2**20  # a batch of long token-id prompts is ~1 MB; anything far above is abuse
    drain_timeout: float = 30.0  # seconds SIGTERM waits for running requests before aborting them
    log_level: str = "info"

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"ServerConfig.{name} {why}, got {getattr(self, name)!r}")

        if not isinstance(self.host, str) or not self.host:
            raise bad("host", "must be a non-empty host name or address")
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 0 <= self.port <= 65535:
            raise bad("port", "must be an int in [0, 65535]")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise bad("api_key", "must be a non-empty string or None")
        if not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1024:
            raise bad("max_body_bytes", "must be an int >= 1024")
        if not isinstance(self.drain_timeout, (int, float)) or not 0 <= self.drain_timeout < float("inf"):
            raise bad("drain_timeout", "must be a finite number of seconds >= 0")
        if self.log_level not in LOG_LEVELS:
            raise bad("log_level", f"must be one of {', '.join(LOG_LEVELS)}")
