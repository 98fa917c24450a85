"""transforms/embed/progress.py: the progress bar on a terminal, counted log lines without one."""

import logging

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
