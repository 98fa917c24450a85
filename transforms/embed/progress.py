"""This process's embedding progress: a tqdm bar on a terminal, else a log line now and then."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

_LOG = logging.getLogger(__name__)


#: The bar's width and the screen's height on a terminal that does not say how large it is.
FALLBACK_COLUMNS, FALLBACK_ROWS = 100, 24


def _columns() -> int:
    import sys

    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return 0


class Progress:
    """This process's embedding progress: a tqdm bar on a terminal (images done out of the
    total, images/s, errors, ETA), else a log line every ``every_s`` seconds.

    The launching process calls :meth:`start` with the run's total; worker processes of other
    runners (which never see it) log their own counts.
    """

    _lock = threading.Lock()
    _state: dict[str, Any] = {}

    @classmethod
    def start(cls, total: int, *, bar: bool, every_s: float = 10.0) -> None:
        """A new run of ``total`` images (each counted once in a multi-backbone run, however
        many tables embed it)."""
        with cls._lock:
            cls._close_bar()
            cls._state = cls._fresh(total, every_s)
            if bar and total:
                from tqdm import tqdm

                # A pseudo-terminal that states no size (``script``, CI runners, ``pty``) reports
                # 0 columns and 0 lines, in which tqdm draws nothing: then a fixed size.
                sized = _columns() > 0
                fixed = {} if sized else {"ncols": FALLBACK_COLUMNS, "nrows": FALLBACK_ROWS}
                cls._state["bar"] = tqdm(
                    total=total,
                    unit="img",
                    desc="embedding",
                    dynamic_ncols=sized,
                    leave=True,
                    **fixed,
                )

    @staticmethod
    def _fresh(total: int = 0, every_s: float = 10.0) -> dict[str, Any]:
        now = time.monotonic()
        return dict(start=now, last=now, done=0, errors=0, total=total, every_s=every_s)

    @classmethod
    def finish(cls) -> None:
        with cls._lock:
            cls._close_bar()
            cls._state = {}

    @classmethod
    def _close_bar(cls) -> None:
        bar = cls._state.pop("bar", None)
        if bar is not None:
            bar.close()

    @classmethod
    def add(cls, *, done: int = 0, errors: int = 0) -> None:
        """``done`` images embedded and ``errors`` images failed (both advance the bar)."""
        with cls._lock:
            state = cls._state
            if not state:  # a worker process that never saw the run's start
                state.update(cls._fresh())
            now = time.monotonic()
            state["done"] += done
            state["errors"] += errors
            bar = state.get("bar")
            if bar is not None:
                if errors:
                    bar.set_postfix(errors=state["errors"], refresh=False)
                bar.update(done + errors)
                return
            finished = state["done"] + state["errors"]
            # The rate is measured from the first batch on: before it, the time went to loading
            # the model, which says nothing about how long the rest will take.
            first = state.setdefault("first", (now, finished))
            if now - state["last"] < state["every_s"]:
                return
            state["last"] = now
            elapsed, since_first = now - first[0], finished - first[1]
            rate = since_first / elapsed if elapsed > 0 and since_first else 0.0
            of = ""
            if state["total"]:
                eta = f", ETA {(state['total'] - finished) / rate:.0f} s" if rate else ""
                of = f" of {state['total']} ({finished / state['total']:.0%}{eta})"
            speed = f", {rate:.1f} images/s" if rate else ""  # none yet: no figure
            _LOG.info(
                "progress (pid %d): %d images%s%s, %d errors",
                os.getpid(),
                finished,
                of,
                speed,
                state["errors"],
            )
