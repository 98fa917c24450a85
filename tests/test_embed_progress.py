"""transforms/embed/progress.py: the progress bar on a terminal, counted log lines without one."""

import logging

import pytest

from transforms.embed.progress import Progress


def test_progress_bar_counts_images_and_errors(capsys):
    Progress.start(5, bar=True)
    Progress.add(done=3)
    Progress.add(errors=2)
    Progress.finish()
    err = capsys.readouterr().err
    assert "embedding" in err and "5/5" in err and "errors=2" in err


def test_progress_without_a_terminal_logs_counts_total_and_eta(caplog):
    caplog.set_level(logging.INFO, logger="transforms.embed")
    Progress.start(10, bar=False, every_s=0.0)
    Progress.add(done=4)
    Progress.add(errors=1)
    Progress.finish()
    lines = [r.getMessage() for r in caplog.records if "progress" in r.getMessage()]
    assert lines and "5 images of 10 (50%, ETA" in lines[-1] and "1 errors" in lines[-1]


@pytest.mark.slow
def test_the_bar_appears_under_a_pseudo_terminal_of_no_size(image_tree, tmp_path):
    """``script``, CI runners and Python's ``pty`` give a terminal of 0 x 0, in which tqdm draws
    nothing unless it is given a size."""
    import os
    import pty
    import select
    import sys
    import time

    argv = [sys.executable, "-m", "pipeline.extract", "--input", str(image_tree)]
    argv += ["--output", str(tmp_path / "out"), "--backbone", "mobilenet_v3_small"]
    argv += ["--weights", "none", "--image-size", "32", "--batch-size", "2"]
    pid, fd = pty.fork()
    if pid == 0:  # the child: the job, its stdin, stdout and stderr on the pseudo-terminal
        os.execv(argv[0], argv)
    out, deadline = b"", time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            if not select.select([fd], [], [], 1)[0]:
                continue
            try:
                data = os.read(fd, 65536)
            except OSError:  # the job ended: the terminal is gone
                break
            if not data:
                break
            out += data
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out.decode(errors="replace")[-2000:]
    text = out.decode(errors="replace")
    assert "embedding: 100%" in text and "12/12" in text and "img/s" in text
