"""Serves a feature table's search: by uploaded image, by a row's id, and by words for CLIP/SigLIP
tables, with a page to do it in a browser.

    python -m pipeline.serve --features OUT [--index DIR] [--host 127.0.0.1] [--port 8080]

At start the table's index (``featurebeam index``; by default ``OUT/_index``) is brought up to
date with the table (built when there is none, updated in place after incremental runs); while it
runs, the service follows the index: once ``featurebeam index`` commits an update (after an
incremental run; the nightly DAG runs it), the new rows are searched within ``--reload-every``
seconds, without a restart. The
model that made the table is rebuilt from its recorded recipe and loaded once: an uploaded image
is decoded, resized and embedded exactly as the pipeline embedded the table's files. Then
``http://HOST:PORT/`` is the page, ``/api/...`` the JSON API (see ``transforms.search_app``) and
``/docs`` its OpenAPI description.

Safe by default: it binds 127.0.0.1; another address needs ``--token`` (every request must then
carry it) or an explicit ``--no-auth``. Thumbnails are served for the table's ids only, never
from a path in the request. No CORS header is sent unless ``--cors-origin`` names an origin.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import threading
from collections.abc import Sequence
from typing import Any

from pipeline import cli
from transforms import index as indexes
from transforms import search, storage

_LOG = logging.getLogger(__name__)
LOOPBACK = ("127.0.0.1", "localhost", "::1")
TOKEN_ENV = "FEATUREBEAM_TOKEN"
#: Seconds between looks at the index for a committed update.
DEFAULT_RELOAD_S = 10.0


def build_parser() -> argparse.ArgumentParser:
    from transforms.search_app import DEFAULT_MAX_UPLOAD_BYTES

    parser = cli.parser("pipeline.serve", description=cli.plain(__doc__))
    parser.add_argument("--features", required=True, help="a feature table folder")
    parser.add_argument(
        "--index",
        default=None,
        help=f"the table's index folder (default: FEATURES/{indexes.DEFAULT_DIRNAME}; built or "
        "updated at start)",
    )
    parser.add_argument(
        "--no-update",
        action=cli.Switch,
        help="serve the index as it is, even when the table changed since it was built "
        "(default: update it at start)",
    )
    parser.add_argument(
        "--reload-every",
        type=float,
        default=DEFAULT_RELOAD_S,
        metavar="SECONDS",
        help="how often to look for an update of the index committed by `featurebeam index` "
        "and serve it (0: never; default: %(default)g)",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument("--port", type=int, default=8080, help="port (default: %(default)s)")
    parser.add_argument(
        "--token",
        default=None,
        help=f"a secret every request must carry (Authorization: Bearer TOKEN; the page: open "
        f"/?token=TOKEN once); default: ${TOKEN_ENV}, else none (loopback only)",
    )
    parser.add_argument(
        "--no-auth",
        action=cli.Switch,
        help="allow a non-loopback --host without a token (anyone who can reach it can search "
        "and see the images)",
    )
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="an origin whose pages may call the API (e.g. https://app.example.com); repeatable "
        "(default: none, no CORS header)",
    )
    parser.add_argument(
        "--max-upload-mb",
        type=float,
        default=DEFAULT_MAX_UPLOAD_BYTES / 2**20,
        help="the largest upload accepted, in MiB; larger ones get 413 before they are read "
        "(default: %(default)g)",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=search.DEFAULT_MAX_PIXELS,
        help="uploads with more pixels are refused before decoding (default: %(default)s)",
    )
    return parser


def check_bind(host: str, token: str | None, no_auth: bool) -> None:
    """Refuses a non-loopback address without a token or ``--no-auth``."""
    if host not in LOOPBACK and not token and not no_auth:
        raise ValueError(
            f"--host {host} would let anyone who can reach this machine search the table and "
            "see its images: pass --token SECRET (or set $FEATUREBEAM_TOKEN), or --no-auth"
        )


def _check_flags(args) -> str | None:
    """Refuses bad flags before anything is loaded or bound; returns the token."""
    token = args.token or os.environ.get(TOKEN_ENV) or None
    check_bind(args.host, token, args.no_auth)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be 0-65535, got {args.port}")
    if args.max_upload_mb <= 0 or args.max_pixels < 1:
        raise ValueError("--max-upload-mb and --max-pixels must be positive")
    if not args.reload_every >= 0:
        raise ValueError(
            f"--reload-every must be 0 (never) or more seconds, got {args.reload_every}"
        )
    return token


def build(argv: Sequence[str] | None = None, *, load_model: bool = True) -> dict[str, Any]:
    """Parses the flags, brings the index up to date and builds the app; serves nothing.

    Returns:
        ``app`` (the ASGI app), ``searcher``, ``host``, ``port`` and ``update`` (what the index
        update did, or None).

    Raises:
        ValueError: bad flags, or an unsafe bind; FileNotFoundError: no table or index.
    """
    from transforms.search_app import create_app

    args = build_parser().parse_args(argv)
    token = _check_flags(args)
    if not storage.exists(args.features):
        raise FileNotFoundError(f"--features {args.features} does not exist")
    index_dir = args.index or indexes.default_dir(args.features)
    update = None
    if not args.no_update:
        update = indexes.build_or_update(args.features, index_dir)
        _LOG.info("index %s: %s", update.action, update.index_dir)
    index = indexes.SearchIndex.open(index_dir)
    behind = indexes.behind(args.features, index_dir) if args.no_update else ""
    if behind:
        _LOG.warning("serving the index as it is (--no-update): %s", behind)
    recipe, recipe_error = _recipe(index.metadata)
    searcher = search.Searcher(
        index,
        features_dir=args.features,
        recipe=recipe,
        recipe_error=recipe_error,
        max_pixels=args.max_pixels,
        load_model=load_model,
    )
    app = create_app(
        searcher,
        token=token,
        cors_origins=tuple(args.cors_origin),
        max_upload_bytes=int(args.max_upload_mb * 2**20),
    )
    return {
        "app": app,
        "searcher": searcher,
        "host": args.host,
        "port": args.port,
        "update": update,
        "behind": behind,
        "reload_every": args.reload_every,
        "token": bool(token),
    }


def _recipe(metadata: dict[str, str]):
    """The table's recipe, or why it cannot be rebuilt (then only by-id search works)."""
    from transforms.models.recipe import FeatureRecipe

    try:
        return FeatureRecipe.from_metadata(metadata), None
    except (KeyError, ValueError) as exc:
        reason = f"its recipe cannot be rebuilt from the table's metadata: {exc}"
        _LOG.warning("image and text search unavailable: %s", reason)
        return None, reason


def describe(served: dict[str, Any]) -> str:
    s = served["searcher"]
    health = s.health()
    text = "yes" if health["text_search"] else f"no ({health['text_search_unavailable']})"
    image = "yes" if health["image_search"] else f"no ({health['image_search_unavailable']})"
    update = served["update"]
    done = f"index {update.action} ({update.kind}, {update.rows:,} rows); " if update else ""
    behind = f"; NOT up to date: {served['behind']}" if served["behind"] else ""
    every = served["reload_every"]
    follows = f"followed every {every:g} s" if every else "not followed (--reload-every 0)"
    return (
        f"{done}serving {health['rows']:,} images of {s.features_dir} at "
        f"http://{served['host']}:{served['port']}/ (API: /api/..., OpenAPI: /docs; image "
        f"search: {image}; text search: {text}; token: {'yes' if served['token'] else 'no'}; "
        f"index {follows}){behind}"
    )


def check_port(host: str, port: int) -> None:
    """Binds the address once and lets it go, before the model loads: a port in use is one line
    at once, not an error after the service said it was serving. (Handing uvicorn this socket
    instead made its 413 to an oversized upload race the connection's reset: measured, 3 of 5
    delivered against 5 of 5 when uvicorn binds.)

    Raises:
        ValueError: the address cannot be bound (in use, not this machine's, no permission).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind((host, port))
        except OSError as exc:
            why = (
                "in use (another server?); pass another --port"
                if exc.errno == errno.EADDRINUSE
                else ""
            )
            raise ValueError(
                f"cannot listen on {host}:{port}: {why or exc.strerror or exc}"
            ) from None


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Builds the service and serves it until stopped (Ctrl-C, SIGTERM)."""
    import uvicorn

    args = build_parser().parse_args(argv)
    _check_flags(args)
    check_port(args.host, args.port)
    served = build(argv)
    print(describe(served), flush=True)
    stop = threading.Event()
    follower = threading.Thread(
        target=served["searcher"].follow,
        args=(served["reload_every"], stop),
        name="follow-index",
        daemon=True,  # never holds the process up, should it be opening an index at exit
    )
    if served["reload_every"]:
        follower.start()
    try:
        uvicorn.run(
            served["app"],
            host=served["host"],
            port=served["port"],
            log_level="warning",
            access_log=False,
            # One process: the model and the index are loaded once; FastAPI runs the searches in
            # its thread pool, and model calls take turns (transforms.search.Searcher).
            workers=1,
        )
    finally:
        stop.set()
        if follower.is_alive():
            follower.join(5)
    return served


def main(argv: Sequence[str] | None = None) -> None:
    cli.run_main(run, argv)


if __name__ == "__main__":
    main()
