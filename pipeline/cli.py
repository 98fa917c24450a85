"""What the jobs' command lines share: one ``main`` wrapper (:func:`run_main`), the parser with
its verbosity flags (:func:`parser`), logging, underscore aliases, the flags several jobs take
(the recipe flags are in ``pipeline.recipe_flags``) and plain-text tables.

A user or environment error (:data:`USER_ERRORS`) ends a job with one line on stderr,
``error: <message>``, and exit status 2; ``-v`` adds the traceback. Any other exception is a bug of
ours and shows its traceback. SIGTERM and SIGHUP stop a job as Ctrl-C does.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import difflib
import gc
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn, TypeVar

from pipeline import logs
from transforms.lease import LeaseHeld, LeaseLost
from transforms.models import recipe as recipes

#: What a user or the user's environment got wrong, as the jobs raise it: a bad flag or
#: combination of flags (ValueError); a file, folder or bucket that is missing, already there, not
#: allowed or full (OSError: FileNotFoundError, FileExistsError, PermissionError, ...); models
#: that do not fit this machine (MemoryError, from ``check_models_fit``); a table another run is
#: writing (LeaseHeld), or that another run took over while this one wrote (LeaseLost).
#: :func:`run_main` prints them as one line and exits 2.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    OSError,
    MemoryError,
    LeaseHeld,
    LeaseLost,
)

#: Exit statuses: a user error is 2 (as argparse's for a bad flag); Ctrl-C is 130 (128 + SIGINT,
#: as a shell reports it), and a stop signal 128 + its number (SIGTERM 143, SIGHUP 129).
USER_ERROR_EXIT = 2
INTERRUPTED_EXIT = 128 + signal.SIGINT

#: What ``timeout``, cron, Airflow, Kubernetes and ``docker stop`` send (SIGTERM), and a closed
#: terminal (SIGHUP): a job stops on them as on Ctrl-C, cleaning up as it goes.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """The job was told to stop by a signal (:data:`STOP_SIGNALS`). A ``KeyboardInterrupt``, so
    that everything that cleans up after Ctrl-C (the lease, the plan file) does so for it too."""

    def __init__(self, signum: int):
        super().__init__(signum)  # the number, so that it pickles (Beam may carry it)
        self.signum = signum

    def __str__(self) -> str:
        return signal.Signals(self.signum).name


@contextlib.contextmanager
def _stopping_on_signals(received: list[int]) -> Iterator[None]:
    """Raises :class:`Stopped` in the main thread on a stop signal, while the block runs, and
    records the signal in ``received``; once stopping, later signals are ignored so that the
    clean-up finishes. A signal ignored when the job started (``nohup``) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        if received:
            return
        received.append(signum)
        raise Stopped(signum)

    previous = {}
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


Result = TypeVar("Result")


def run_main(run: Callable[[list[str]], Result], argv: Sequence[str] | None = None) -> Result:
    """What every job's ``main`` does around its ``run``: sets up logging
    (:func:`configure_logging`), runs it, and ends a failed run as a user should see it.

    - a user or environment error (:data:`USER_ERRORS`): one line on stderr,
      ``error: <message>``, exit status 2; with ``-v``/``--verbose`` its traceback first;
    - Ctrl-C (KeyboardInterrupt): one line, ``interrupted``, exit status 130 (traceback with
      ``-v``); SIGTERM and SIGHUP stop it the same way (:class:`Stopped`: the lease is given back
      and the plan file removed as the exception unwinds), with one line, ``stopped by SIGTERM``,
      and exit status 143 (SIGHUP: 129);
    - any other exception is a bug of ours: it propagates, and Python prints its traceback.

    ``SystemExit`` passes through untouched (argparse's ``usage: ... error: ...``, exit 2).

    Args:
        run: the job's ``run(argv)``.
        argv: the job's flags (default: ``sys.argv[1:]``).

    Returns:
        What ``run`` returned (the summary that ``main`` prints).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    configure_logging(argv)
    verbose = logs.verbosity_from(argv) > 0
    received: list[int] = []
    try:
        try:
            with _stopping_on_signals(received):
                return run(argv)
        except Exception as exc:
            if received:  # raised inside a Beam step, which re-raises it as a RuntimeError
                raise Stopped(received[0]) from exc
            raise
    except Stopped as stopped:
        _exit(f"stopped by {stopped}", 128 + stopped.signum, verbose=verbose)
    except KeyboardInterrupt:
        _exit("interrupted", INTERRUPTED_EXIT, verbose=verbose)
    except USER_ERRORS as exc:
        _exit(f"error: {_one_line(exc, verbose=verbose)}", USER_ERROR_EXIT, verbose=verbose)
    except RuntimeError as exc:
        cause = _user_error_in_step(exc)
        if cause is None:
            raise
        _exit(f"error: {_one_line(cause, verbose=verbose)}", USER_ERROR_EXIT, verbose=verbose)


def _user_error_in_step(exc: BaseException) -> BaseException | None:
    """The user error a Beam step failed with, or None. Beam re-raises a step's exception with
    its step name added, as the same type where it can and as a RuntimeError where it cannot (an
    OSError with an errno, such as a PermissionError writing a shard); the original is its
    context."""
    if not getattr(exc, "_tagged_with_step", False):
        return None
    seen = exc.__context__ or exc.__cause__
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, USER_ERRORS):
            return seen
        seen = seen.__context__ or seen.__cause__
    return None


def _one_line(exc: BaseException, *, verbose: bool) -> str:
    """The error's first line (a message of several lines, as some library errors are, keeps
    the rest for ``-v``, which prints the whole traceback and message)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[0] if len(lines) == 1 or verbose else f"{lines[0]} (more with -v)"


def _exit(line: str, status: int, *, verbose: bool) -> NoReturn:
    """Ends the job from inside an ``except`` block: the traceback if ``verbose``, then the one
    line (last, so that it is the line left on the screen)."""
    sys.stdout.flush()
    if verbose:
        traceback.print_exc()
    print(line, file=sys.stderr, flush=True)
    raise SystemExit(status)


class Parser(argparse.ArgumentParser):
    """A job's ``argparse`` parser, with two habits of ours: our flags take underscores too
    (:func:`underscore_aliases`), and a flag no one knows ends the job with one line naming the
    closest valid flag (``error: unknown flag --batchsize (did you mean --batch-size?)``),
    before any other complaint (a misspelled required flag is named as misspelled, not missing).
    """

    def parse_known_args(self, args=None, namespace=None):
        args = spelled_out(self, sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def parse_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        refuse_unknown(self, args, beam=False)
        return super().parse_args(args, namespace)

    def error(self, message: str):
        """One line, ``error: ...`` and exit 2, pointing at ``--help`` rather than printing the
        whole usage (a job's usage runs to 20 lines)."""
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def refuse_unknown(parser: argparse.ArgumentParser, argv: Sequence[str], *, beam: bool) -> None:
    """Exits with status 2 and one line if ``argv`` holds a flag that is neither the parser's
    nor (``beam=True``) one of Beam's or its runners' pipeline options."""
    if "-h" in argv or "--help" in argv:
        return  # the real parse prints the help, with the required flags as required
    required = [action for action in parser._actions if action.required]
    for action in required:  # look for strangers first; argparse names missing flags later
        action.required = False
    try:
        _, extras = argparse.ArgumentParser.parse_known_args(parser, spelled_out(parser, argv))
    finally:
        for action in required:
            action.required = True
    valid = [o for action in parser._actions for o in action.option_strings]
    if beam and extras:
        from pipeline import runners  # only jobs that run Beam pay for its import

        extras, beam_flags = runners.unknown_flags(extras)
        valid += beam_flags
    for extra in extras:
        if extra == "--":
            break
        if extra.startswith("-") and len(extra) > 1:
            name = extra.split("=", 1)[0]
            close = difflib.get_close_matches(name, valid, n=1, cutoff=0.7)
            hint = f" (did you mean {close[0]}?)" if close else ""
            parser.exit(USER_ERROR_EXIT, f"error: unknown flag {name}{hint}\n")
    if beam and extras:
        parser.exit(USER_ERROR_EXIT, f"error: unexpected argument {extras[0]!r}\n")


class _DefaultsShown(argparse.HelpFormatter):
    """Adds ``(default: X)`` to the help of a flag that takes a value and has a default, unless
    the help already states it (in words, for flags whose default is "not given")."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            action.option_strings
            and action.nargs != 0
            and action.default not in (None, [], "", argparse.SUPPRESS)
            and "default" not in text
        ):
            text += " (default: %(default)s)"
        return text


def plain(doc: str) -> str:
    """A docstring's first paragraph as help text: reStructuredText markup removed."""
    first = doc.strip().split("\n\n")[0]
    first = re.sub(r":\w+:`~?([^`]+)`", r"\1", first)
    return " ".join(first.replace("``", "").split())


#: The command a job is being run as, when not ``python -m MODULE``: (module, prog), set by
#: ``featurebeam`` (:func:`invoked_as`) around the job it dispatches to.
_INVOKED_AS: list[tuple[str, str]] = []


@contextlib.contextmanager
def invoked_as(module: str, prog: str) -> Iterator[None]:
    """Within it, the parser of ``module`` names itself ``prog`` (``featurebeam extract``) in
    its usage, help and errors."""
    _INVOKED_AS.append((module, prog))
    try:
        yield
    finally:
        _INVOKED_AS.pop()


def parser(module: str, description: str | None = None, **kwargs: Any) -> argparse.ArgumentParser:
    """A job's parser (:class:`Parser`): named as the job is run (``featurebeam extract``
    through the console command, ``python -m pipeline.extract`` as a module), with the
    ``-q``/``--quiet`` and ``-v``/``--verbose`` flags of ``pipeline.logs``.

    Args:
        module: the job's module, e.g. ``"pipeline.extract"``.
        description: the help's first paragraph.
        **kwargs: other ``argparse.ArgumentParser`` arguments (``formatter_class``, ``epilog``).
    """
    prog = next((p for m, p in reversed(_INVOKED_AS) if m == module), f"python -m {module}")
    base = kwargs.pop("formatter_class", argparse.HelpFormatter)
    formatter = type("HelpFormatter", (_DefaultsShown, base), {})
    made = Parser(prog=prog, description=description, formatter_class=formatter, **kwargs)
    logs.verbosity_flags(made)
    return made


def configure_logging(argv: Sequence[str] | None = None) -> None:
    """What every job's ``main`` does first: its logging (``pipeline.logs``: our lines at INFO,
    ``-q`` warnings only, ``-v`` debug and the frameworks' own lines, without the frameworks'
    noise), and a quick exit.

    The exit: at interpreter shutdown Python's garbage collector walks every object of the
    TensorFlow and Beam modules, which took 2.5 s of each job on a 2-core machine. Freezing the
    heap in the last exit handler (registered first, so it runs last) skips that walk; it took
    0.4 s. Exit handlers still run, and our files are closed before ``main`` returns.
    """
    logs.setup(logs.verbosity_from(argv))
    atexit.register(gc.freeze)


def add_batch_size_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--batch-size",
        type=int,
        default=recipes.DEFAULT_BATCH_SIZE,
        help="images per model call (default: %(default)s)",
    )


#: The words an on/off flag takes after ``=`` (any case).
TRUE_WORDS = ("true", "yes", "1", "on")
FALSE_WORDS = ("false", "no", "0", "off")


def switch_value(text: str) -> bool:
    """``true``/``false`` (or yes/no, 1/0, on/off, any case) as a bool."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(
        f"expected true or false (or yes/no, 1/0, on/off), got {text!r}"
    )


class Switch(argparse.Action):
    """An on/off flag: ``--prune`` (on), ``--prune=true``, ``--prune=false`` (off). Dataflow
    template parameters and Airflow operators pass every flag as ``--name=value``, so the
    ``=value`` form must work; the value is never taken from the next argument (a bare flag is
    rewritten to ``--flag=true`` before parsing, :func:`spelled_out`), so ``--prune /some/path``
    cannot swallow a path."""

    def __init__(self, option_strings, dest, default=False, required=False, help=None):
        super().__init__(
            option_strings,
            dest,
            nargs="?",
            const=True,
            default=default,
            type=switch_value,
            required=required,
            help=help,
            metavar="true|false",
        )

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)


def spelled_out(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``argv`` as our parsers read it: underscore spellings as dashes
    (:func:`underscore_aliases`), and a bare on/off flag (:class:`Switch`) as ``--flag=true``."""
    switches = {o for a in parser._actions if isinstance(a, Switch) for o in a.option_strings}
    out = []
    for arg in underscore_aliases(parser, argv):
        if arg == "--":  # what follows is not ours
            out.extend(argv[len(out) :])
            break
        out.append(f"{arg}=true" if arg in switches else arg)
    return out


def add_overwrite_flag(parser: argparse.ArgumentParser, what: str = "folder") -> None:
    """``--overwrite``: the one rule for a job's output (``storage.staged_output``)."""
    parser.add_argument(
        "--overwrite",
        action=Switch,
        help=f"replace an output {what} that already holds results; the old results stay until "
        "the new ones are complete (default: refuse)",
    )


def add_allow_empty_flag(parser: argparse.ArgumentParser, *, prune: bool = False) -> None:
    """``--allow-empty``: inputs that list no image are an error unless it is given
    (``launch.check_not_empty``)."""
    also = ", or with --mode incremental --prune remove every row" if prune else ""
    parser.add_argument(
        "--allow-empty",
        action=Switch,
        help=f"accept inputs that list no image (by default an error): write an empty table{also}",
    )


def underscore_aliases(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """Accepts ``--batch_size`` for our ``--batch-size`` (Beam's own flags use underscores, and
    Dataflow flex-template parameter names cannot hold dashes). Beam's flags are left alone."""
    ours = {o for action in parser._actions for o in action.option_strings}
    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        dashed = "--" + name[2:].replace("_", "-")
        if arg.startswith("--") and name not in ours and dashed in ours:
            arg = dashed + eq + value
        out.append(arg)
    return out


def parse_known(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> tuple[argparse.Namespace, list[str]]:
    """Our flags (underscore spellings accepted) and the rest, which are Beam's pipeline options.

    A flag that is neither ours nor a Beam or runner option ends the job (:func:`refuse_unknown`):
    Beam would drop it with a warning and run without it.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    refuse_unknown(parser, argv, beam=True)
    return parser.parse_known_args(argv)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, right: set[int]) -> str:
    """Plain aligned text, one line per row under ``header``: the columns in ``right`` (numbers)
    aligned right, the others left."""
    lines = [tuple(header), *(tuple(row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in lines
    )
