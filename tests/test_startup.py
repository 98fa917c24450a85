"""transforms/startup.py: marks from process start, the first of each name winning, and the
breakdown printed as each step's own seconds."""

from __future__ import annotations

from transforms import startup


def test_the_first_mark_of_a_name_wins(monkeypatch):
    monkeypatch.setattr(startup, "_marks", {})
    assert startup.mark("imports") is True
    first = startup.marks()["imports"]
    assert startup.mark("imports") is False
    assert startup.marks() == {"imports": first}


def test_steps_are_each_marks_own_seconds_in_order():
    recorded = {"trace": 9.25, "imports": 3.0, "tensorflow import": 8.0}
    assert startup.steps(recorded) == "imports 3.0, tensorflow import 5.0, trace 1.2"


def test_describe_gives_the_last_mark_and_the_steps(monkeypatch):
    monkeypatch.setattr(startup, "_marks", {"imports": 2.0, "first batch": 6.5})
    assert startup.describe() == "6.5 s after process start: imports 2.0, first batch 4.5"
