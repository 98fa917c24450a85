"""What a job prints on stderr: our own log lines, a progress bar, and no framework noise.

- ``-q``/``--quiet``: warnings and errors only, no progress bar.
- default: our INFO lines; Beam's INFO lines (``Converting string literal type hint to Any``,
  ``Creating state cache``) are hidden, and so are the lines TensorFlow's C++ runtime writes to
  the process's stderr at import on a machine without a GPU (``All log messages before
  absl::InitializeLog()``, ``Could not find cuda drivers``, ``failed call to cuInit``, the CPU
  feature notice).
- ``-v``/``--verbose``: our DEBUG lines, Beam's INFO lines, and the C++ runtime unfiltered.

The C++ lines cannot be turned off from Python: absl writes everything logged before its
initialisation straight to file descriptor 2, whatever ``TF_CPP_MIN_LOG_LEVEL`` says. So
:func:`setup` points descriptor 2 at a pipe read by a small child process that drops exactly those
lines and passes every other line through (a process, so that it still drains the last lines when
the job aborts), while Python's own ``sys.stderr`` (log lines, tracebacks, the progress bar) keeps
writing to the real stderr directly, so nothing of ours is delayed, reordered or lost if the
process dies.
"""

import contextlib
import logging
import os
import re
import subprocess
import sys

#: Lines of the TensorFlow/XLA C++ runtime that say nothing to a user of a CPU machine. absl's
#: line format: severity letter, MMDD, time, thread id, file:line].
NOISE = (
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called"),
    re.compile(r"^[IW]\d{4} [\d:.]+\s+\d+ \S+\.(cc|h):\d+\] "),  # absl INFO and WARNING lines
    re.compile(r"^E\d{4} [\d:.]+\s+\d+ cuda\w*\.cc:\d+\] failed call to cuInit"),
    re.compile(r"^To enable the following instructions: .* rebuild TensorFlow"),
)

#: Our loggers' names (the jobs and the transforms).
OURS = ("pipeline", "transforms", "__main__")

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_installed: list[int] = []


def verbosity_flags(parser) -> None:
    """Adds ``-q``/``--quiet`` and ``-v``/``--verbose`` to a job's parser."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "-q",
        "--quiet",
        action="store_const",
        const=-1,
        dest="verbosity",
        help="only warnings and errors; no progress bar",
    )
    group.add_argument(
        "-v",
        "--verbose",
        action="store_const",
        const=1,
        dest="verbosity",
        help="debug lines, and the frameworks' own (Beam, TensorFlow) unfiltered",
    )
    parser.set_defaults(verbosity=0)


def verbosity_from(argv) -> int:
    """-1, 0 or 1 from ``-q``/``--quiet`` and ``-v``/``--verbose`` in ``argv`` (read before the
    parser runs, so that logging is set up before anything is imported or listed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-v" in argv or "--verbose" in argv:
        return 1
    if "-q" in argv or "--quiet" in argv:
        return -1
    return 0


def setup(verbosity: int = 0) -> None:
    """Sets up the process's logging for a job run from the command line (see the module
    docstring). Call it first, before TensorFlow is imported."""
    ours = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}[max(-1, min(1, verbosity))]
    if verbosity < 1:
        # TensorFlow's own Python and C++ INFO lines (oneDNN notices and the like).
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        filter_native_stderr()  # first: the log handler writes to the new sys.stderr
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Formatter(_FORMAT, tracebacks=verbosity >= 1))
        if verbosity < 1:
            handler.addFilter(_drop_reraised)
        root.addHandler(handler)
    root.setLevel(logging.WARNING if verbosity < 1 else logging.INFO)
    for name in OURS:
        logging.getLogger(name).setLevel(ours)


class _Formatter(logging.Formatter):
    """Our format; the frameworks' records without their tracebacks unless ``-v`` (a job's own
    error line says what failed; ``-v`` shows where)."""

    def __init__(self, fmt: str, *, tracebacks: bool):
        super().__init__(fmt)
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and not self.tracebacks and not record.name.startswith(OURS):
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
        return super().format(record)


#: Framework error records of exceptions that are raised on to the job, which ends with them as
#: its one ``error:`` line (``pipeline.cli.run_main``): Beam logs a failing step's exception
#: before re-raising it, gcsfs logs a request that ran out of retries before raising.
_RERAISED = (
    ("apache_beam", "[while running '"),
    ("gcsfs", "out of retries"),
)


def _drop_reraised(record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR or record.name.startswith(OURS):
        return True
    message = record.getMessage()
    return not any(record.name.startswith(n) and text in message for n, text in _RERAISED)


def progress_enabled() -> bool:
    """Whether a progress bar is wanted: our INFO lines are on and stderr is a terminal."""
    if not logging.getLogger("transforms").isEnabledFor(logging.INFO):
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def around_bar(bar: bool):
    """A context in which log lines are printed above the progress bar (tqdm's own redirect)."""
    if not bar:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


def is_noise(line: str) -> bool:
    return any(pattern.search(line) for pattern in NOISE)


def filter_native_stderr() -> None:
    """Drops :data:`NOISE` lines written to file descriptor 2 by native code; Python's
    ``sys.stderr`` is moved to a duplicate of the real stderr first. Once per process; a no-op
    where Python's stderr is not the process's own (a test harness captures it) or descriptor 2
    cannot be duplicated.

    The filter is a small child process, not a thread, so that it drains every line, a fatal
    one included, even when this process aborts; it ends when the last writer (this process, or
    a worker process that inherited the descriptor) is gone.
    """
    if _installed or sys.stderr is not sys.__stderr__:
        return  # done, or stderr is captured by a harness (pytest) that owns descriptor 2
    try:
        sys.stderr.flush()
        real = os.dup(2)
        read_end, write_end = os.pipe()
        subprocess.Popen(
            [sys.executable, "-c", "from pipeline.logs import _filter_main; _filter_main()"],
            stdin=read_end,
            stdout=real,
            stderr=real,
            start_new_session=True,  # a Ctrl-C for the job does not stop the filter first
        )
    except (OSError, AttributeError, ValueError):
        return
    os.close(read_end)
    # Python's stderr writes to the real stderr (line-buffered, like the original).
    sys.stderr = open(real, "w", buffering=1, encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
    os.dup2(write_end, 2)
    os.close(write_end)
    _installed.append(real)


def _filter_main() -> None:
    """The filter process: stdin to stdout, line by line, without the noise lines."""
    out = sys.stdout.buffer
    for line in sys.stdin.buffer:
        if not is_noise(line.decode("utf-8", "replace")):
            out.write(line)
            out.flush()
