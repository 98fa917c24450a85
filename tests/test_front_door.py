"""What a user meets first: unknown flags refused with the closest valid name, help that reads
like Beam's and Keras', the backbone list, and the figures a run prints (plan, summary, progress).
"""

from __future__ import annotations

import importlib
import logging

import pytest

from pipeline import config, console, logs

SMALL = ["--backbone", "mobilenet_v3_small", "--weights", "none", "--image-size", "32"]


@pytest.fixture(autouse=True)
def _logging_levels_restored():
    """Jobs' ``main`` set the process's log levels; later tests expect their own."""
    names = ["", *logs.OURS]
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def _exit_line(capsys, argv) -> str:
    """Runs ``featurebeam ARGV``; returns the last stderr line after checking exit status 2."""
    with pytest.raises(SystemExit) as exit_:
        console.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    return err.strip().splitlines()[-1]


# --- item 5: unknown flags are refused --------------------------------------------------------


def test_a_misspelled_flag_is_refused_with_the_closest_name(tmp_path, capsys):
    argv = ["extract", "--input", str(tmp_path), "--output", str(tmp_path / "o"), *SMALL]
    line = _exit_line(capsys, [*argv, "--batchsize", "8"])
    assert line == "error: unknown flag --batchsize (did you mean --batch-size?)"


def test_a_misspelled_beam_flag_suggests_the_beam_flag(tmp_path, capsys):
    argv = ["extract", "--input", str(tmp_path), "--output", str(tmp_path / "o")]
    line = _exit_line(capsys, [*argv, "--direct_num_worker", "2"])
    assert line == "error: unknown flag --direct_num_worker (did you mean --direct_num_workers?)"


def test_an_unknown_flag_is_named_before_a_missing_required_one(capsys):
    assert _exit_line(capsys, ["extract", "--inptu", "x"]).startswith(
        "error: unknown flag --inptu (did you mean --input?)"
    )


@pytest.mark.parametrize("command", sorted(console.COMMANDS))
def test_every_job_refuses_an_unknown_flag(command, capsys):
    line = _exit_line(capsys, [command, "--verbse"])
    assert line == "error: unknown flag --verbse (did you mean --verbose?)"


def test_classify_and_neighbors_queries_refuse_unknown_flags(tmp_path, capsys):
    line = _exit_line(
        capsys, ["classify", "--input", "x", "--output", "y", "--top_k", "3", "--topk", "2"]
    )
    assert line == "error: unknown flag --topk (did you mean --top-k?)"
    line = _exit_line(capsys, ["neighbors", "--features", "x", "--query", "y", "--batchsize=4"])
    assert line == "error: unknown flag --batchsize (did you mean --batch-size?)"


@pytest.mark.parametrize(
    "beam",
    [
        ["--direct_num_workers", "2", "--direct_running_mode", "multi_threading"],
        ["--runner", "DirectRunner"],
        ["--runner=DirectRunner", "--temp_location", "/tmp/x"],
        ["--region", "europe-west4", "--project", "p", "--machine_type", "n1-standard-4"],
        ["--runner", "dask", "--dask_local_workers", "2", "--dask_npartitions", "4"],
        ["--dask_client_address", "127.0.0.1:8786"],
        ["--experiments", "a", "--dry_run", "true"],
    ],
)
def test_beam_and_runner_flags_still_pass(beam, tmp_path):
    argv = ["--input", str(tmp_path), "--output", str(tmp_path / "o"), *SMALL]
    parsed, beam_args = config.parse_args([*argv, *beam])
    assert beam_args == beam
    assert parsed.batch_size == 32 or parsed.batch_size > 0


def test_our_flags_take_underscores(tmp_path):
    argv = ["--input", str(tmp_path), "--output", str(tmp_path / "o"), *SMALL]
    parsed, beam_args = config.parse_args([*argv, "--batch_size", "8", "--chunk_size=3"])
    assert (parsed.batch_size, parsed.run.chunk_size, beam_args) == (8, 3, [])


def test_jobs_without_beam_flags_take_underscores_too():
    from pipeline import report, train_head

    args = train_head.build_parser().parse_args(["--features", "f", "--model_dir", "m"])
    assert args.model_dir == "m"
    args = report.build_parser().parse_args(["--features", "f", "--output", "o", "--max_points=5"])
    assert args.max_points == 5


def test_a_real_run_with_beam_flags(image_tree, tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["--input", str(image_tree / "val"), "--output", str(out), *SMALL]
    extract = importlib.import_module("pipeline.extract")
    summary = extract.run([*argv, "--runner", "DirectRunner", "--temp_location", str(tmp_path)])
    assert summary["rows"] == 6
