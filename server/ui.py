"""The browser UI at `/ui`: static files shipped in the package (`server/ui/`), no build step
and nothing loaded from elsewhere.

The files hold no secrets, so they are served without the API key (`server.middleware`
exempts `/ui`); the page asks for the key and sends it with each API call, as any client does.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles

UI_PATH = "/ui"
UI_DIR = Path(__file__).with_name("ui")
# The page talks to this server only: no CDN, no inline script, no framing by other sites.
UI_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; "
                               "form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Served from the installed package: a new version's files are fetched, not a cached old one.
    "Cache-Control": "no-cache",
}


class UIFiles(StaticFiles):
    """Static files with the UI's headers; `/ui/` serves `index.html`."""

    async def get_response(self, path: str, scope):
        response = await super().get_response(path, scope)
        response.headers.update(UI_HEADERS)
        return response


def mount_ui(app: FastAPI) -> None:
    """Serve the UI at `/ui/` (`/ui` redirects there)."""
    app.mount(UI_PATH, UIFiles(directory=UI_DIR, html=True), name="ui")
