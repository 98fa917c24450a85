"""The jobs' one ``main`` wrapper (``cli.run_main``) and their shared parser (``cli.parser``)."""

import importlib
import subprocess
import sys

import pytest

from pipeline import cli, console
from transforms.lease import LeaseHeld

USER_ERRORS = [
    ValueError("--k must be >= 1, got 0"),
    FileNotFoundError("input not found: /nowhere"),
    FileExistsError("/out holds a table: pass --overwrite to replace it"),
    PermissionError(13, "Permission denied", "/read-only/out"),
    OSError(28, "No space left on device"),
    MemoryError("the models need 9.1 GiB, this machine has 8"),
    LeaseHeld("the table is being written by host:1234 (since 10 s)"),
]


def _raising(exc: BaseException):
    def run(argv):
        raise exc

    return run


@pytest.mark.parametrize("exc", USER_ERRORS, ids=lambda e: type(e).__name__)
def test_a_user_error_is_one_line_and_exit_2(exc, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.run_main(_raising(exc), [])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: {exc}\n"


def test_verbose_shows_the_traceback_then_the_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.run_main(_raising(ValueError("--k must be >= 1, got 0")), ["-v"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):")
    assert "ValueError: --k must be >= 1, got 0" in err
    assert err.splitlines()[-1] == "error: --k must be >= 1, got 0"


def test_a_bug_is_not_a_user_error():
    with pytest.raises(KeyError, match="recipe"):
        cli.run_main(_raising(KeyError("recipe")), [])


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.run_main(_raising(KeyboardInterrupt()), [])
    assert exit_.value.code == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_an_empty_message_names_the_error(capsys):
    with pytest.raises(SystemExit):
        cli.run_main(_raising(FileNotFoundError()), [])
    assert capsys.readouterr().err == "error: FileNotFoundError\n"


def test_run_main_returns_what_run_returned():
    assert cli.run_main(lambda argv: {"argv": argv}, ["--k", "3"]) == {"argv": ["--k", "3"]}


def _script(body: str, *flags: str) -> subprocess.CompletedProcess:
    """A process whose ``main`` is ``cli.run_main(run)``: what a user sees on the real stderr."""
    code = (
        f"import sys\nfrom pipeline import cli\n\ndef run(argv):\n    {body}\n\ncli.run_main(run)"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *flags], capture_output=True, text=True, timeout=120
    )


def test_in_a_process_a_user_error_is_exit_2_and_a_bug_a_traceback():
    user = _script("raise FileNotFoundError('input not found: /nowhere')")
    assert (user.returncode, user.stderr) == (2, "error: input not found: /nowhere\n")
    verbose = _script("raise FileNotFoundError('input not found: /nowhere')", "-v")
    assert verbose.returncode == 2
    assert "Traceback" in verbose.stderr
    assert verbose.stderr.splitlines()[-1] == "error: input not found: /nowhere"
    bug = _script("return {}['recipe']")
    assert bug.returncode == 1
    assert "Traceback" in bug.stderr and "KeyError: 'recipe'" in bug.stderr
    assert "error: " not in bug.stderr


JOBS = [module for name, (module, _) in console.COMMANDS.items() if name != "bench"]


@pytest.mark.parametrize("module", JOBS)
def test_every_job_main_goes_through_the_wrapper(module, monkeypatch, capsys):
    job = importlib.import_module(module)
    monkeypatch.setattr(job, "run", _raising(FileNotFoundError("no feature table here: /t")))
    with pytest.raises(SystemExit) as exit_:
        job.main([])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: no feature table here: /t\n"


def test_the_bench_goes_through_the_wrapper(monkeypatch, capsys):
    from benchmarks import bench

    monkeypatch.setattr(bench, "run_bench", _raising(FileNotFoundError("no images under /x")))
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--only", "plan"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: no images under /x\n"


@pytest.mark.parametrize("module", [*JOBS, "benchmarks.bench"])
def test_every_job_parser_has_its_name_and_the_verbosity_flags(module, capsys):
    job = importlib.import_module(module)
    parser = job.build_parser() if hasattr(job, "build_parser") else None
    if parser is None:  # extract's parser lives with its config object
        from pipeline.config import build_parser

        parser = build_parser()
    assert parser.prog == f"python -m {module.removesuffix('.bench')}"
    flags = {o for action in parser._actions for o in action.option_strings}
    assert {"-q", "--quiet", "-v", "--verbose"} <= flags


def _actions_of(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                yield from _actions_of(subparser)
        else:
            yield action


def test_every_on_off_flag_takes_true_and_false():
    """Template parameters and Airflow pass every flag as --name=value: a plain store_true
    flag would refuse --prune=true. Every job's parser, every on/off flag."""
    import pkgutil

    import pipeline
    from pipeline import config

    parsers = {"extract": config.build_parser()}
    for info in pkgutil.iter_modules(pipeline.__path__):
        module = importlib.import_module(f"pipeline.{info.name}")
        if hasattr(module, "build_parser"):
            parsers[info.name] = module.build_parser()
    switches = []
    for name, parser in parsers.items():
        for action in _actions_of(parser):
            flag = action.option_strings[0] if action.option_strings else ""
            if action.nargs == 0 and flag not in ("-h", "-q", "-v"):
                pytest.fail(f"{name} {flag} is on/off but takes no =true/false")
            if isinstance(action, cli.Switch):
                switches.append((name, flag))
    assert {("extract", "--prune"), ("extract", "--l2-normalize"), ("neighbors", "--exact")} <= set(
        switches
    ), switches


@pytest.mark.parametrize(
    ("argv", "prune", "retry"),
    [
        ([], False, False),
        (["--prune"], True, False),
        (["--prune=true", "--retry-errors=false"], True, False),
        (["--prune=FALSE", "--retry_errors=true"], False, True),
        (["--prune=Yes", "--retry_errors=1"], True, True),
        (["--prune=no", "--retry-errors=0"], False, False),
        (["--prune=on", "--prune=off"], False, False),  # the last one counts
    ],
)
def test_on_off_flags_take_true_and_false(argv, prune, retry):
    from pipeline.config import parse_args

    config, beam = parse_args(["--input", "x", "--output", "y", "--mode", "incremental", *argv])
    assert (config.run.prune, config.run.retry_errors, beam) == (prune, retry, [])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prune=maybe"], "argument --prune: expected true or false"),
        (["--allow_empty=2"], "argument --allow-empty: expected true or false"),
        (["--prune", "/some/path"], "unexpected argument '/some/path'"),
    ],
)
def test_a_bad_on_off_value_is_one_line_naming_the_flag(argv, message, capsys):
    from pipeline.config import parse_args

    with pytest.raises(SystemExit) as stopped:
        parse_args(["--input", "x", "--output", "y", "--mode", "incremental", *argv])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_help_shows_the_value_an_on_off_flag_takes(capsys):
    from pipeline.config import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    assert "--prune [true|false]" in capsys.readouterr().out


def test_prune_true_prunes_and_prune_false_keeps_in_a_real_run(image_tree, tmp_path):
    from pipeline.extract import run
    from transforms import table

    out = str(tmp_path / "t")
    common = ["--input", str(image_tree), "--output", out, "--backbone", "mobilenet_v2"]
    common += ["--weights", "none", "--image-size", "32"]
    run(common)
    (image_tree / "val" / "cats" / "1.jpg").unlink()

    def uris():
        return table.read_table(out).column("uri").to_pylist()

    run([*common, "--mode", "incremental", "--prune=false"])
    assert any(u.endswith("val/cats/1.jpg") for u in uris())  # off: the row is kept
    run([*common, "--mode=incremental", "--prune=true"])
    assert uris() and not any(u.endswith("val/cats/1.jpg") for u in uris())
