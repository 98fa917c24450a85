"""The ``featurebeam`` console command: declared in pyproject.toml, dispatching to the jobs."""

from __future__ import annotations

import pathlib
import tomllib

import pytest

from pipeline import console


def test_console_script_is_declared():
    pyproject = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"
    scripts = tomllib.loads(pyproject.read_text())["project"]["scripts"]
    assert scripts == {"featurebeam": "pipeline.console:main"}


def test_help_lists_every_job(capsys):
    console.main(["--help"])
    out = capsys.readouterr().out
    for name in ("extract", "train-head", "classify", "export-model", "finetune", "stage-weights"):
        assert f"  {name} " in out


def test_a_command_runs_its_job(capsys):
    with pytest.raises(SystemExit) as exit_:
        console.main(["train_head", "--help"])  # underscores work too
    assert exit_.value.code == 0
    assert "--features" in capsys.readouterr().out


def test_unknown_command_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown command 'extrct' \\(did you mean extract\\?\\)"):
        console.main(["extrct"])
