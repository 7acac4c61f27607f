"""What a link to the app shows: its title, description and picture, as ASGI middleware in front of the page.

Gradio-free (starlette, its web framework, only): `stylize.ui` puts `LinkPreview.middleware()` in the app's
launch options.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from pathlib import Path

from starlette.middleware import Middleware
from starlette.responses import FileResponse

ASSETS = Path(__file__).resolve().parent.parent / "assets"
PREVIEW_IMAGE = ASSETS / "preview.jpg"  # what a link to the app shows
PREVIEW_ROUTE = "/link-preview.jpg"  # where it is served: gradio's file route would name its place on the server
TITLE = "Stylize"
DESCRIPTION = "Repaint a photo in the style of an artwork, and watch it happen."


class LinkPreview:
    """Gives the page the title, description and picture that link previews show. gradio's page template starts
    with fixed ones ("Gradio", a literal "{url}") that no setting reaches, and sets the title from a script, so
    they are replaced in the HTML. With server-side rendering on, gradio's Node server writes the page, title
    included, and this never sees it. The picture is served at PREVIEW_ROUTE, a name that says nothing of where
    the app is installed."""

    META = re.compile(rb'\s*<meta\s+(?:property="og:|name="twitter:)[^>]*>', re.DOTALL)

    def __init__(self, app: Callable) -> None:
        self.app = app

    @classmethod
    def middleware(cls) -> Middleware:
        return Middleware(cls)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD") and scope["path"] == PREVIEW_ROUTE:
            return await FileResponse(PREVIEW_IMAGE)(scope, receive, send)
        if scope["type"] != "http" or scope["method"] != "GET" or scope["path"].rstrip("/") != "":
            return await self.app(scope, receive, send)
        start: dict = {}
        body = bytearray()

        async def rewritten(message: dict) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            body.extend(message.get("body", b""))
            if message.get("more_body"):
                return
            page = bytes(body)
            if dict(start["headers"]).get(b"content-type", b"").startswith(b"text/html"):
                title = b"" if b"<title>" in page else f"<title>{TITLE}</title>\n".encode()  # else set by script
                page = self.META.sub(b"", page).replace(b"</head>", title + self.tags(scope) + b"</head>", 1)
            headers = [(key, value) for key, value in start["headers"] if key.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(page)).encode())]})
            await send({"type": "http.response.body", "body": page})

        await self.app(scope, receive, rewritten)

    @staticmethod
    def tags(scope: dict) -> bytes:
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        scheme = headers.get("x-forwarded-proto", scope["scheme"])  # behind a proxy (a Space), as the user sees it
        host = headers.get("x-forwarded-host", headers.get("host", "localhost"))
        page = f"{scheme}://{host}{scope.get('root_path', '')}/"
        image = f"{page}{PREVIEW_ROUTE.lstrip('/')}"
        tags = [
            ("property", "og:type", "website"),
            ("property", "og:url", page),
            ("property", "og:title", TITLE),
            ("property", "og:description", DESCRIPTION),
            ("property", "og:image", image),
            ("name", "twitter:card", "summary_large_image"),
            ("name", "twitter:title", TITLE),
            ("name", "twitter:description", DESCRIPTION),
            ("name", "twitter:image", image),
            ("name", "description", DESCRIPTION),
        ]
        return "".join(
            f'<meta {kind}="{key}" content="{html.escape(value)}" />\n' for kind, key, value in tags
        ).encode()
