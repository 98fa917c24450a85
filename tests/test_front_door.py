"""What a user meets first: unknown flags refused with the closest valid name, help that reads
like Beam's and Keras', the backbone list, and the figures a run prints (plan, summary, progress).
"""

from __future__ import annotations

import importlib
import logging

import pytest

from pipeline import config, console

SMALL = ["--backbone", "mobilenet_v3_small", "--weights", "none", "--image-size", "32"]


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


# --- item 14: help reads like Beam's and Keras' -----------------------------------------------


def _help(command, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        console.main([command, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def _parser(command):
    from pipeline import cli

    module = console.COMMANDS[command][0]
    with cli.invoked_as(module.removesuffix(".bench"), f"featurebeam {command}"):
        job = importlib.import_module(module)
        return job.build_parser() if hasattr(job, "build_parser") else config.build_parser()


@pytest.mark.parametrize("command", sorted(console.COMMANDS))
def test_help_names_the_command_and_reads_plainly(command, capsys):
    text = _help(command, capsys)
    assert text.startswith(f"usage: featurebeam {command} ")
    for markup in ("``", ":func:", ":data:", ":class:", "python -m", "pipeline.", "transforms."):
        assert markup not in text, f"{markup!r} in featurebeam {command} --help"
    assert len(text) < 12_000  # no 100-name lists, no module docs


@pytest.mark.parametrize("command", sorted(console.COMMANDS))
def test_every_flag_has_a_sentence_and_its_default(command):
    import argparse

    parser = _parser(command)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        flag = "/".join(action.option_strings)
        assert action.help, f"featurebeam {command} {flag} has no help"
        if action.option_strings and action.nargs != 0 and not action.required:
            text = formatter._expand_help(action)
            assert "default" in text or "required" in text, f"{command} {flag}: no default"


def test_help_through_python_m_keeps_the_module_name():
    from pipeline.config import build_parser

    assert build_parser().prog == "python -m pipeline.extract"


def test_help_shows_required_flags_as_required(capsys):
    assert "--features FEATURES" in _help("train-head", capsys).split("\n\n")[0]
    assert "[--features FEATURES]" not in _help("train-head", capsys)


def test_backbones_lists_every_registered_backbone(capsys):
    from transforms.models.registry import BACKBONES

    console.main(["backbones"])
    lines = capsys.readouterr().out.splitlines()
    header, rows = lines[0].split(), [line.split() for line in lines[1:] if line.strip()]
    assert header[:4] == ["name", "family", "input", "width"]
    assert [r[0] for r in rows] == list(BACKBONES)
    for row in rows:
        spec = BACKBONES[row[0]]
        assert (row[1], int(row[2]), int(row[3])) == (
            spec.family,
            spec.input_size,
            spec.feature_dim,
        )
        assert float(row[4]) == pytest.approx(spec.params_m, abs=0.051)
        assert (row[5], row[6]) == (spec.default_weights, spec.default_resize)


def test_backbones_filters_by_family(capsys):
    from transforms.models.registry import BACKBONES

    console.main(["backbones", "--family", "dinov2"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:] if line.strip()]
    expected = [n for n, s in BACKBONES.items() if s.family == "dinov2"]
    assert expected and [r[0] for r in rows] == expected


def test_backbones_refuses_an_unknown_family(capsys):
    line = _exit_line(capsys, ["backbones", "--family", "dinov"])
    assert line.startswith("error: unknown family 'dinov' (did you mean ") and "dinov2" in line


def test_backbone_help_points_to_the_backbones_command(capsys):
    text = " ".join(_help("extract", capsys).split())
    assert "see featurebeam backbones" in text
    assert "convnext_xlarge" not in text


def test_an_unknown_backbone_suggests_a_few_names():
    from transforms.models.registry import get_backbone

    with pytest.raises(ValueError) as error:
        get_backbone("resnet9000")
    message = str(error.value)
    assert message.startswith("unknown backbone 'resnet9000' (did you mean ")
    assert "featurebeam backbones" in message
    named = message.split("did you mean ")[1].split("?")[0].split(", ")
    assert 1 <= len(named) <= 5 and "convnext_xlarge" not in message


# --- item 17: figures that mean something -----------------------------------------------------


def test_a_run_that_embedded_nothing_reports_no_rate():
    from pipeline.extract import format_summary

    summary = {
        "output": "/o",
        "metadata": {
            "backbone": "mobilenet_v3_small",
            "pooling": "avg",
            "feature_dim": 576,
            "input_size": 32,
            "weights_fingerprint": "random-init:seed=1234",
        },
        "inputs": 6,
        "rows": 6,
        "errors": 0,
        "seconds": 3.0,
        "feature_files": ["/o/features-0.parquet"],
        "run": {"embedded": 0, "kept_rows": 6},
        "mode": "incremental",
    }
    text = format_summary(summary)
    assert "images/s" not in text
    assert "nothing embedded" in text
    summary["run"]["embedded"] = 6
    assert "2.0 images/s" in format_summary(summary)


def test_progress_eta_uses_the_rate_after_the_first_batch(monkeypatch, caplog):
    from transforms.embed import progress

    clock = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    progress.Progress.start(100, bar=False, every_s=0.0)
    caplog.set_level(logging.INFO, logger=progress.__name__)
    try:
        clock[0] += 50.0  # model loading: not part of the rate
        progress.Progress.add(done=10)
        clock[0] += 1.0
        progress.Progress.add(done=10)
    finally:
        progress.Progress.finish()
    last = caplog.records[-1].getMessage()
    assert "20 images of 100 (20%, ETA 8 s)" in last
    assert "10.0 images/s" in last
    assert "ETA" not in caplog.records[0].getMessage()  # one batch gives no rate yet
