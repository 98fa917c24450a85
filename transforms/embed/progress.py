"""This process's embedding progress: a tqdm bar on a terminal, else a log line now and then."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

_LOG = logging.getLogger(__name__)


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
        """A new run of ``total`` images (summed over the tables of a multi-backbone run)."""
        with cls._lock:
            cls._close_bar()
            cls._state = cls._fresh(total, every_s)
            if bar and total:
                from tqdm import tqdm

                cls._state["bar"] = tqdm(
                    total=total, unit="img", desc="embedding", dynamic_ncols=True, leave=True
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
            if now - state["last"] < state["every_s"]:
                return
            state["last"] = now
            finished = state["done"] + state["errors"]
            rate = finished / max(now - state["start"], 1e-9)
            of = ""
            if state["total"]:
                eta = (state["total"] - finished) / rate if rate else float("inf")
                of = f" of {state['total']} ({finished / state['total']:.0%}, ETA {eta:.0f} s)"
            _LOG.info(
                "progress (pid %d): %d images%s, %.1f images/s, %d errors",
                os.getpid(),
                finished,
                of,
                rate,
                state["errors"],
            )
