"""Where a worker process's start-up time goes: seconds from process start to named marks.

A job reports the time from its process's start to its first embedded batch, and what came in
between (imports, planning, TensorFlow import, model build, weight load, trace), in its log and
its summary; ``benchmarks`` prints the breakdown. Marks are per process and the first of
each name wins (a process that loads two models reports the first).
"""

import logging
import os
import threading
import time

_LOG = logging.getLogger(__name__)
_lock = threading.Lock()
_marks: dict[str, float] = {}


def _process_start() -> float:
    """This process's start as a ``time.time()`` value (Linux ``/proc``; elsewhere the moment
    this module was imported, which misses the interpreter's start and the first imports)."""
    try:
        with open(f"/proc/{os.getpid()}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()


PROCESS_START = _process_start()


def mark(name: str) -> bool:
    """Records that ``name`` happened now, the first time only; True when it was recorded."""
    with _lock:
        if name in _marks:
            return False
        _marks[name] = time.time() - PROCESS_START
        return True


def marks() -> dict[str, float]:
    """Seconds from process start to each mark, in the order they happened."""
    with _lock:
        return dict(sorted(_marks.items(), key=lambda item: item[1]))


def steps(recorded: dict[str, float]) -> str:
    """``imports 4.1, list + plan 0.3, ...``: each mark's own seconds, in order, from
    :func:`marks` (this process's, or another's read back from its summary)."""
    previous = 0.0
    parts = []
    for name, at in sorted(recorded.items(), key=lambda item: item[1]):
        parts.append(f"{name} {at - previous:.1f}")
        previous = at
    return ", ".join(parts)


def describe() -> str:
    """``9.8 s after process start: imports 4.1, ...`` (each step's own seconds)."""
    recorded = marks()
    last = max(recorded.values(), default=0.0)
    return f"{last:.1f} s after process start: {steps(recorded)}"
