"""API-key authentication: a pure ASGI middleware in front of everything but the public paths.

It runs before the body is read or parsed, so an unauthenticated client gets 401 whatever it sends (never a
422 that tells it about the schema, nor a 413). Keys are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from rapidlm.errors import ConfigError
from rapidlm.serve.protocol import APIError

# Probes and scrapers carry no key; the playground page asks the user for one and sends it on its requests.
PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics", "/", "/index.html", "/favicon.ico"})
PUBLIC_PREFIXES = ("/static/",)


def load_api_key(path: str | Path) -> str:
    """The key in `path` (surrounding whitespace stripped); ConfigError naming the file when unusable."""
    p = Path(path)
    try:
        key = p.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"api key file {p}: cannot read it ({exc})") from exc
    if not key:
        raise ConfigError(f"api key file {p} is empty")
    if any(c.isspace() for c in key):
        raise ConfigError(f"api key file {p} holds whitespace inside the key; put the key alone on one line")
    return key


def key_matches(presented: str | None, expected: str) -> bool:
    """Constant-time comparison. Both sides are hashed first so not even the key's length leaks."""
    if presented is None:
        return False
    a = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
    b = hashlib.sha256(expected.encode("utf-8")).digest()
    return hmac.compare_digest(a, b)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.api_key is None or scope["type"] != "http" or is_public(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        auth = None
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                auth = value.decode("latin-1")
                break
        if key_matches(bearer_token(auth), self.api_key):
            await self.app(scope, receive, send)
            return
        err = APIError(
            401,
            "missing or invalid API key: send 'Authorization: Bearer <key>'",
            code="invalid_api_key",
        )
        body = json.dumps(err.body()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
