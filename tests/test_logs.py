"""A run's stderr as a user sees it: our lines and the progress, none of the frameworks' noise."""

import os
import re
import subprocess
import sys

import pytest
from conftest import write_image_tree

from pipeline import logs

#: Lines a default run on a CPU machine used to print (TensorFlow 2.21, Beam 2.77).
NOISE_LINES = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796034450.030421   30297 cudart_stub.cc:31] Could not find cuda drivers on "
    "your machine, GPU will not be used.",
    "I0000 00:00:1796034450.162755   30297 cpu_feature_guard.cc:227] This TensorFlow binary is "
    "optimized to use available CPU instructions in performance-critical operations.",
    "To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow "
    "with the appropriate compiler flags.",
    "E0000 00:00:1796034456.686511   30297 cuda_platform.cc:52] failed call to cuInit: INTERNAL: "
    "CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
]
BEAM_INFO = ("Converting string literal type hint", "Creating state cache")


def _framework_info(stderr: str) -> list[str]:
    """Beam's own INFO log lines (``... INFO apache_beam.runners...: Creating state cache``): the
    default run hides them, ``-v`` shows them (our code logs nothing at DEBUG on this path)."""
    return [line for line in stderr.splitlines() if re.search(r" INFO apache_beam[\w.]*: ", line)]


@pytest.mark.parametrize("line", NOISE_LINES)
def test_noise_lines_are_recognised(line):
    assert logs.is_noise(line)


@pytest.mark.parametrize(
    "line",
    [
        "E0000 00:00:1796034456.686511   30297 bfc_allocator.cc:47] Out of memory trying to "
        "allocate 2.00GiB",
        "F0000 00:00:1796034456.686511   30297 check.cc:12] Check failed: x == y",
        "2026-11-30 10:27:40,394 INFO transforms.embed: loaded mobilenet_v2",
        "Traceback (most recent call last):",
        "error: input not found: /nowhere",
    ],
)
def test_real_errors_and_our_lines_pass(line):
    assert not logs.is_noise(line)


def _job(tmp_path, *flags):
    images = tmp_path / "images"
    write_image_tree(images, per_class=2, size=(48, 40))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_CPP")}
    argv = [sys.executable, "-m", "pipeline.extract", "--input", str(images)]
    argv += ["--output", str(tmp_path / "out"), "--backbone", "mobilenet_v2", "--weights", "none"]
    argv += ["--image-size", "64", *flags]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


def test_a_default_run_prints_none_of_the_frameworks_noise(tmp_path):
    proc = _job(tmp_path)
    assert proc.returncode == 0, proc.stderr
    for line in proc.stderr.splitlines():
        assert not logs.is_noise(line), line
        assert not any(text in line for text in BEAM_INFO), line
    assert _framework_info(proc.stderr) == []
    assert "INFO pipeline.launch: run " in proc.stderr  # our own lines stay
    assert "first batch embedded" in proc.stderr
    assert "after process start: imports" in proc.stderr
    assert "inputs 8 = rows 8 + errors 0" in proc.stdout


def test_quiet_prints_nothing_but_the_result_and_verbose_everything(tmp_path):
    quiet = _job(tmp_path, "-q")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr.strip() == ""
    assert "inputs 8 = rows 8 + errors 0" in quiet.stdout
    verbose = _job(tmp_path, "--verbose", "--overwrite")
    assert verbose.returncode == 0, verbose.stderr
    assert _framework_info(verbose.stderr), verbose.stderr  # Beam's INFO lines
    assert any(logs.is_noise(line) for line in verbose.stderr.splitlines())  # unfiltered
