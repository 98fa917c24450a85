"""Which generation of a table's index the search service serves, and moving on to the newest
one ``featurebeam index`` committed while requests go on (``transforms.search`` searches it).

A generation is everything a request reads: the index, its rows' columns, its filter masks and
thumbnails. It is replaced whole, never changed, so a request holds the one it started with,
even after the commit that replaced it removed its files (its vectors stay memory-mapped).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from transforms.index import SearchIndex, read_manifest
from transforms.index_files import MANIFEST, generation_tag
from transforms.models.recipe import table_fingerprint

_LOG = logging.getLogger(__name__)


class Generation:
    """One generation of the index and what searches read from it.

    Attributes:
        index: the opened index.
        tag: the generation's own name (its files'; a rebuilt index restarts its numbers, not
            its tags).
        ids, uris, labels, splits: the rows' columns, by position.
        label_set, split_set: the values the rows have (filters are checked against them).
        masks, thumbnails: caches that belong to this generation's rows (guarded by the caller).
        search_lock: searches take turns (see ``__init__``).
    """

    def __init__(self, index: SearchIndex):
        self.index = index
        self.tag = generation_tag(index.manifest)
        self.labels = index.rows.column("label").to_numpy(zero_copy_only=False)
        self.splits = index.rows.column("split").to_numpy(zero_copy_only=False)
        self.ids = index.rows.column("image_id").to_pylist()
        self.uris = index.rows.column("uri").to_pylist()
        self.label_set = frozenset(x for x in self.labels if x is not None)
        self.split_set = frozenset(x for x in self.splits if x is not None)
        self.masks: OrderedDict[tuple, np.ndarray | None] = OrderedDict()
        self.thumbnails: OrderedDict[str, bytes] = OrderedDict()
        # Searches take turns: an exact one is a matrix-vector product over every row that
        # numpy's BLAS already spreads over the cores, a faiss one re-ranks faiss' candidates
        # on the stored vectors the same way; concurrent ones only thrash the cores (by id, 4
        # clients, python -m benchmarks: exact at 10k rows p50 132 ms concurrent; faiss at 100k
        # rows p99 60.6 ms concurrent, 23.2 ms in turns; docs/performance.md).
        self.search_lock = threading.Lock()


class Following:
    """The generation served now (:attr:`current`), and the index folder it follows.

    Attributes:
        current: the generation requests read.
        stale: why the index's newest generation is not served ('' when it is): one rebuilt for
            another recipe (the loaded model made the served vectors, not those), one that
            cannot be opened now, or no ``index.json`` at all.
    """

    def __init__(self, index: SearchIndex):
        self.current = Generation(index)
        self.stale = ""
        self._refused: str | None = None  # the tag of a generation of another recipe

    def refresh(self) -> bool:
        """Serves the index's newest generation when one was committed since; True when it moved
        on. A generation of another recipe is refused (and not read again).

        Raises:
            OSError, ValueError, KeyError, RuntimeError (faiss): the newest generation cannot be
                opened; the served one stays.
        """
        current = self.current
        manifest = read_manifest(current.index.index_dir)
        if manifest is None:
            self.stale = (
                f"{current.index.index_dir} holds no {MANIFEST} now; serving generation "
                f"{current.index.generation} as it was"
            )
            return False
        tag = generation_tag(manifest)
        if tag == current.tag:
            self.stale = ""  # what could not be read before is the served one again
            return False
        if tag == self._refused:
            return False
        if self._refuse(manifest):  # checked before opening: a refused one is never read
            return False
        newer = SearchIndex.open(current.index.index_dir)  # the newest, should one commit now
        if self._refuse(newer.manifest):
            return False
        self.current = Generation(newer)
        self.stale = ""
        _LOG.info(
            "index generation %s: %d rows (was %s: %d)",
            self.current.tag, len(newer), current.tag, len(current.index),
        )  # fmt: skip
        return True

    def _refuse(self, manifest: dict[str, Any]) -> bool:
        current = self.current.index
        if table_fingerprint(manifest["metadata"]) == table_fingerprint(current.metadata):
            return False
        self._refused = generation_tag(manifest)
        self.stale = (
            f"{current.index_dir} was rebuilt for another recipe (generation "
            f"{manifest['generation']}); serving generation {current.generation} until "
            "`featurebeam serve` is restarted"
        )
        _LOG.warning("%s", self.stale)
        return True

    def follow(self, every: float, stop: threading.Event) -> None:
        """Calls :meth:`refresh` every ``every`` seconds until ``stop`` is set. A generation
        that cannot be opened is tried again at the next turn, the served one kept, and said
        in :attr:`stale` (logged once per cause)."""
        while not stop.wait(every):
            try:
                self.refresh()
            # Whatever a half-written or damaged index raises (faiss raises RuntimeError): the
            # thread must outlive it, or the service stops following without a word.
            except Exception as exc:
                why = f"the index's newest generation cannot be opened: {exc}"
                if why != self.stale:
                    _LOG.warning("%s", why, exc_info=True)
                self.stale = why
