"""The search service's HTTP face (FastAPI): the JSON API, the thumbnails and the page, over a
:class:`transforms.search.Searcher`.

The contract (also in the OpenAPI description at ``/openapi.json`` and ``/docs``):

- ``GET /api/health``: the table, its recipe, row count, index kind and what can be searched;
- ``GET /api/search?image_id=ID&k=K`` and ``GET /api/search?text=WORDS&k=K``;
- ``POST /api/search``: a multipart file field ``image`` (``k``, ``label``, ``split`` as query or
  form fields);
- every search answers ``{"results": [{"image_id", "uri", "similarity", "label", "split"}]}``,
  best first; ``label`` and ``split`` filter the rows searched;
- ``GET /api/images/{image_id}``: a JPEG thumbnail of a table image, by id only;
- ``GET /``: the page.

Requests are checked before they are read whole: an upload over ``max_upload_bytes`` is
answered 413 from its ``Content-Length``, or, without one, as soon as it has sent more than
that (:class:`_UploadLimit`, a pure ASGI wrapper, so the body is never buffered first). With a
token, every route but the OpenAPI description asks for it: an ``Authorization: Bearer`` header,
or the cookie that opening the page as ``/?token=...`` sets (so its thumbnails load).
"""

# No `from __future__ import annotations`: FastAPI reads the route annotations at runtime.

import hmac
import json
from importlib import resources
from typing import Annotated, Any

from transforms.search import DEFAULT_K, MAX_K, QueryError, Searcher

#: Uploads larger than this are refused (413) before they are read whole.
DEFAULT_MAX_UPLOAD_BYTES = 20 * 2**20
TOKEN_COOKIE = "featurebeam_token"
_PAGE = "search_page.html"


class _TooLarge(Exception):
    pass


class _UploadLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 — at once when its
    Content-Length says so, else when the bytes received pass it — and never read whole."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _too_large(send, self.limit)
        seen, started = 0, False

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        async def sending(message):
            nonlocal started
            started = True
            await send(message)

        try:
            await self.app(scope, counted, sending)
        except _TooLarge:
            if not started:
                await _too_large(send, self.limit)


async def _too_large(send, limit: int) -> None:
    body = json.dumps({"detail": f"upload larger than the limit of {limit:,} bytes"}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def create_app(
    searcher: Searcher,
    *,
    token: str | None = None,
    cors_origins: tuple[str, ...] = (),
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
):
    """The ASGI app serving ``searcher``.

    Args:
        searcher: the table's index and model.
        token: when given, every request but the OpenAPI description must carry it.
        cors_origins: origins allowed to call the API from their pages (none by default: no
            CORS header is sent).
        max_upload_bytes: the largest request body accepted.
    """
    from fastapi import FastAPI, File, Form, Query, Request, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(
        title="featurebeam search",
        description=f"Search the feature table {searcher.features_dir} by image, id or words.",
        version="1",
    )
    open_paths = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if token is None or request.url.path in open_paths:
            return await call_next(request)
        given = _bearer(request.headers.get("authorization", ""))
        given = given or request.cookies.get(TOKEN_COOKIE, "")
        from_query = request.query_params.get("token", "") if request.url.path == "/" else ""
        given = given or from_query
        if not hmac.compare_digest(given.encode(), token.encode()):
            return JSONResponse(
                {"detail": "missing or wrong token: send Authorization: Bearer TOKEN"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        response = await call_next(request)
        if from_query:  # the page's own requests (fetch, <img>) then carry it
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response

    @app.exception_handler(QueryError)
    async def _query_error(request: Request, exc: QueryError):
        return JSONResponse({"detail": exc.reason}, status_code=exc.status)

    def answer(hits) -> dict[str, Any]:
        return {"results": [hit.__dict__ for hit in hits]}

    K = Annotated[int, Query(ge=1, le=MAX_K, description="results wanted")]
    Filter = Annotated[str | None, Query(max_length=500)]

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        """The table, its recipe, rows, index kind, and which searches it answers."""
        return searcher.health()

    @app.get("/api/search")
    def search(
        image_id: Annotated[str | None, Query(max_length=200)] = None,
        text: Annotated[str | None, Query(max_length=1000)] = None,
        k: K = DEFAULT_K,
        label: Filter = None,
        split: Filter = None,
    ) -> dict[str, Any]:
        """Rows nearest to a table row (``image_id``) or to words (``text``)."""
        if (image_id is None) == (text is None):
            raise QueryError(422, "give exactly one of image_id or text (or POST an image)")
        if image_id is not None:
            return answer(searcher.by_id(image_id, k, label=label, split=split))
        return answer(searcher.by_text(text, k, label=label, split=split))

    @app.post("/api/search")
    async def search_image(
        image: Annotated[UploadFile, File(description="an image file")],
        k: Annotated[int | None, Form(ge=1, le=MAX_K)] = None,
        label: Annotated[str | None, Form(max_length=500)] = None,
        split: Annotated[str | None, Form(max_length=500)] = None,
        k_query: Annotated[int | None, Query(alias="k", ge=1, le=MAX_K)] = None,
        label_query: Annotated[str | None, Query(alias="label", max_length=500)] = None,
        split_query: Annotated[str | None, Query(alias="split", max_length=500)] = None,
    ) -> dict[str, Any]:
        """Rows nearest to an uploaded image, embedded with the table's recipe; ``k``,
        ``label`` and ``split`` may be form fields or query parameters."""
        data = await image.read()
        await image.close()
        hits = await run_in_threadpool(
            searcher.by_image,
            data,
            k or k_query or DEFAULT_K,
            label=label if label is not None else label_query,
            split=split if split is not None else split_query,
        )
        return answer(hits)

    @app.get("/api/images/{image_id}", response_class=Response)
    def thumbnail(image_id: str):
        """A JPEG thumbnail of a table image (ids of the table only)."""
        return Response(
            searcher.thumbnail(image_id),
            media_type="image/jpeg",
            headers={"Cache-Control": "private, max-age=3600"},
        )

    page = resources.files("transforms").joinpath(_PAGE).read_text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index_page():
        return HTMLResponse(page)

    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization"],
        )
    return _UploadLimit(app, max_upload_bytes)


def _bearer(header: str) -> str:
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""
