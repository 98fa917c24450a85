"""transforms/report_data.py: which rows the report's map draws (the page itself: test_report.py)."""

from __future__ import annotations

import numpy as np

from transforms.report_data import sample_rows


def test_every_row_up_to_the_limit():
    np.testing.assert_array_equal(sample_rows(5, 5), np.arange(5))
    np.testing.assert_array_equal(sample_rows(0, 5), np.arange(0))


def test_past_the_limit_a_sorted_distinct_sample_the_same_for_a_seed():
    rows = sample_rows(6, 5)
    assert len(rows) == 5 and len(set(rows.tolist())) == 5
    assert rows.tolist() == sorted(rows.tolist()) and set(rows.tolist()) <= set(range(6))
    np.testing.assert_array_equal(sample_rows(1000, 25, seed=3), sample_rows(1000, 25, seed=3))
    assert not np.array_equal(sample_rows(1000, 25, seed=3), sample_rows(1000, 25, seed=4))
