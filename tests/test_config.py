"""pipeline/config.py: the extraction job's flags become one validated ExtractConfig."""

from __future__ import annotations

import pytest

from pipeline.config import parse_args


def test_decode_threads_flag_takes_auto_or_a_count():
    from pipeline.config import parse_args

    def threads(*flags):
        config, _ = parse_args(["--input", "x", "--output", "y", *flags])
        return config.decode_threads

    assert threads() == 0  # auto
    assert threads("--decode-threads", "auto") == 0
    assert threads("--decode-threads", "3") == 3
    with pytest.raises(SystemExit):
        threads("--decode-threads", "0")


def test_flags_fill_the_config_and_beams_flags_are_passed_on():
    config, beam_args = parse_args(
        ["--input", "a", "--input", "b", "--output", "o", "--mode", "incremental"]
        + ["--batch-size", "5", "--chunk-size", "7", "--runner", "DirectRunner"]
    )
    assert (config.run.inputs, config.run.output, config.run.mode) == (
        ("a", "b"),
        "o",
        "incremental",
    )
    assert (config.batch_size, config.run.chunk_size) == (5, 7)
    assert beam_args == ["--runner", "DirectRunner"]
    assert [r.backbone for r in config.recipes] == [config.recipe.backbone]
    assert config.tables == [(config.recipe, config.run)]


def test_several_backbones_write_one_table_each_under_the_output():
    config, _ = parse_args(
        [
            "--input",
            "a",
            "--output",
            "o",
            "--backbone",
            "mobilenet_v2,resnet50",
            "--weights",
            "none",
        ]
    )
    assert [(r.backbone, run.output) for r, run in config.tables] == [
        ("mobilenet_v2", "o/mobilenet_v2"),
        ("resnet50", "o/resnet50"),
    ]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--output", "o"], "--input is required (or --demo)"),
        (["--input", "a"], "--output is required (or --demo)"),
        (
            ["--input", "a", "--output", "o", "--batch-size", "0"],
            "--batch-size must be >= 1, got 0",
        ),
        (["--input", "a", "--output", "o", "--max-pixels", "0"], "--max-pixels must be >= 1"),
        (["--input", "a", "--output", "o", "--mode", "sometimes"], "invalid choice: 'sometimes'"),
    ],
)
def test_bad_flags_exit_naming_the_flag(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(flags)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_batch_size_one_is_allowed():
    config, _ = parse_args(["--input", "a", "--output", "o", "--batch-size", "1"])
    assert config.batch_size == 1
