"""Which rows train, which validate and which test: the one rule every job that scores follows.

A table's ``split`` column comes from class folders (``train/ants/x.jpg`` -> ``train``) or a
manifest. When any row has a split, the column decides:

- rows marked ``train``/``training`` train;
- rows marked ``val``/``valid``/``validation``/``dev`` validate;
- rows marked ``test``/``testing`` are scored separately (test accuracy), never trained on;
- rows with another split name, or with none, are left out of all three, and counted by name;
- a table with train rows but no val rows validates on a stratified share of its train rows
  (``fraction``), and says so;
- a table with val rows but no train rows is refused: there is nothing to train on.

Only a table with no split information at all (no column, or every value empty) is split at
random: a stratified ``fraction`` of its rows validates. :attr:`Split.source` says which was used.

``train_head`` and ``finetune`` train on it; the neighbours job scores the val rows' k-NN
against the train rows (leave-one-out only when there is no split information); the report shows
what the head recorded. numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TRAIN_NAMES = frozenset({"train", "training"})
VAL_NAMES = frozenset({"val", "valid", "validation", "dev"})
TEST_NAMES = frozenset({"test", "testing"})
#: :attr:`Split.source` when the split column decided.
SPLIT_COLUMN = "split column"
#: What a row without a split is counted as in :attr:`Split.left_out`.
NO_SPLIT = "(no split)"
DEFAULT_FRACTION = 0.2


def _name(split: Any) -> str:
    return str(split).strip().lower() if split is not None else ""


def has_splits(splits: Sequence[Any]) -> bool:
    """Whether any row carries a split name."""
    return any(_name(s) for s in splits)


@dataclass(frozen=True)
class Split:
    """Row indices (sorted) of each role, and how they were chosen.

    Attributes:
        source: ``"split column"``, ``"random stratified 20%"``, or with train rows but no val
            rows ``"split column; no val rows: random stratified 20% of the train rows"``.
        left_out: rows in no role, by split name (:data:`NO_SPLIT` for rows without one).
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    source: str
    left_out: dict[str, int] = field(default_factory=dict)

    @property
    def from_column(self) -> bool:
        """Whether the split column chose the rows (else a random split)."""
        return self.source.startswith(SPLIT_COLUMN)

    def describe(self) -> dict[str, Any]:
        """What a report records: the source and the rows in each role."""
        out: dict[str, Any] = {
            "source": self.source,
            "train_rows": len(self.train),
            "validation_rows": len(self.val),
            "test_rows": len(self.test),
        }
        if self.left_out:
            out["left_out"] = dict(self.left_out)
        return out


def _check_fraction(fraction: float) -> None:
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--val-split must be in (0, 1), got {fraction}")


def _percent(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def _roles(splits: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    names = [_name(s) for s in splits]
    train = np.array([i for i, n in enumerate(names) if n in TRAIN_NAMES], dtype=int)
    val = np.array([i for i, n in enumerate(names) if n in VAL_NAMES], dtype=int)
    test = np.array([i for i, n in enumerate(names) if n in TEST_NAMES], dtype=int)
    left_out: dict[str, int] = {}
    for split, n in zip(splits, names, strict=True):
        if n not in TRAIN_NAMES | VAL_NAMES | TEST_NAMES:
            key = str(split).strip() if n else NO_SPLIT
            left_out[key] = left_out.get(key, 0) + 1
    return train, val, test, dict(sorted(left_out.items()))


def split_rows(
    splits: Sequence[Any],
    labels: np.ndarray,
    *,
    fraction: float = DEFAULT_FRACTION,
    seed: int = 0,
    where: str = "the table",
) -> Split:
    """Train, validation and test rows by the module's rule.

    Args:
        splits: each row's split name (None or "" for none).
        labels: each row's label (for the stratified share).
        fraction: the share that validates when the split column does not name val rows.
        seed: for that share.
        where: the table, for messages.

    Raises:
        ValueError: ``fraction`` outside (0, 1); val or test rows but no train rows.
    """
    _check_fraction(fraction)
    labels = np.asarray(labels)
    if not has_splits(splits):
        train, val = stratified_split(labels, fraction, seed=seed)
        empty = np.zeros(0, dtype=int)
        return Split(train, val, empty, f"random stratified {_percent(fraction)}")
    train, val, test, left_out = _roles(splits)
    if not len(train):
        found = ", ".join(f"{k} ({v})" for k, v in left_out.items()) or "val/test rows only"
        raise ValueError(
            f"{where} has a split column but no train rows (found: {found}); mark training "
            "images train (train/<label>/*.jpg) or give the training rows as their own table"
        )
    source = SPLIT_COLUMN
    if not len(val):
        kept, held = stratified_split(labels[train], fraction, seed=seed)
        train, val = train[kept], train[held]
        source = (
            f"{SPLIT_COLUMN}; no val rows: random stratified {_percent(fraction)} of the train rows"
        )
    return Split(train, val, test, source, left_out)


def training_rows(splits: Sequence[Any], *, source: str) -> Split:
    """The rows that train when validation comes from elsewhere (``--val-features``,
    ``--val-images``): with split information, the train rows only (test rows are scored, the
    rest left out and counted); without, every row. ``val`` is empty."""
    empty = np.zeros(0, dtype=int)
    if not has_splits(splits):
        return Split(np.arange(len(splits)), empty, empty, source)
    train, val, test, left_out = _roles(splits)
    if len(val):
        left_out = {**left_out, "val rows (validation is given separately)": len(val)}
    return Split(train, empty, test, source, left_out)


def describe(validation: Any) -> str:
    """A head report's ``validation`` entry in words (older heads recorded a string)."""
    if isinstance(validation, dict):
        return str(validation.get("source"))
    return str(validation)


def stratified_split(
    labels: np.ndarray, fraction: float, *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a stratified (train, validation) split; each class keeps at least one of each
    when it has two or more examples."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_val = int(round(len(idx) * fraction))
        n_val = min(max(n_val, 1 if len(idx) > 1 else 0), len(idx) - 1)
        val.extend(idx[:n_val])
        train.extend(idx[n_val:])
    return np.sort(np.array(train, dtype=int)), np.sort(np.array(val, dtype=int))
