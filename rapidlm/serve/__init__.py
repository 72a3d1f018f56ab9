"""rapidlm.serve: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the AsyncEngine.

`rapidlm serve --model M` runs it; create_app builds the app alone (tests, embedding in another server).
"""

from rapidlm.serve.app import create_app
from rapidlm.serve.config import ServerConfig

__all__ = ["ServerConfig", "create_app"]
