"""The OpenAI-compatible HTTP server over the continuous-batching engine (``lmzoo serve``); no model logic here.

Layers, each its own file: ``protocol`` checks request bodies; ``async_engine`` runs the engine on one thread
behind asyncio; ``text`` turns a choice's tokens into text (whole characters, stop strings cut);
``completions`` maps requests to engine sequences and back to OpenAI's JSON and SSE shapes; ``app`` holds
the routes. FastAPI and uvicorn are optional dependencies (``pip install 'lmzoo[serve]'``): importing this
package needs neither, ``create_app`` says clearly when they are missing.
"""

from __future__ import annotations

from lmzoo.errors import LmzooError

MISSING = "lmzoo serve needs fastapi and uvicorn: pip install 'lmzoo[serve]'"


def require_server_packages() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise LmzooError(f"{MISSING} ({e})") from None


def create_app(model_dir, **options):
    """``lmzoo.serve.app.create_app``: the FastAPI app serving ``model_dir`` (see there for the options)."""
    require_server_packages()
    from lmzoo.serve.app import create_app as create

    return create(model_dir, **options)


__all__ = ["create_app", "require_server_packages", "MISSING"]
