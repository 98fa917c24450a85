"""The search service following its index (``transforms.search_generations``): requests that
hold a generation an update replaced, an index rebuilt from nothing, a damaged ``index.json``.
Synthetic tables; no model."""

from __future__ import annotations

import os
import pathlib
import shutil
import threading
import time

import numpy as np
import pytest
from test_index import clustered, small_table, write_shard  # noqa: F401 (a fixture)

from transforms import index, search


@pytest.fixture
def table(request):
    # test_index's table: 300 clustered rows in two shards
    return pathlib.Path(request.getfixturevalue("small_table")[0])


def grow(out, start: int, n: int, name: str) -> None:
    write_shard(out, name, range(start, start + n), clustered(n, seed=start))


def searcher_of(out) -> search.Searcher:
    ix = index.SearchIndex.open(index.default_dir(str(out)))
    return search.Searcher(ix, features_dir=str(out), load_model=False)


@pytest.mark.parametrize("kind", ["exact", "faiss"])
def test_a_request_holding_a_replaced_generation_still_answers(table, kind):
    # The commit removes the old generation's files; a request that began on it keeps reading
    # them (vectors memory-mapped, rows and the faiss index in memory).
    index.build_or_update(str(table), kind=kind)
    old = index.SearchIndex.open(index.default_dir(str(table)))
    queries = clustered(5, seed=9)
    before = old.search(queries, 5)
    files = set(os.listdir(index.default_dir(str(table))))
    grow(table, 300, 40, "features-B-00000-of-00001.parquet")
    assert index.build_or_update(str(table)).action == "updated"
    old_files = files - {"index.json", ".lock"}
    assert old_files and not old_files & set(os.listdir(index.default_dir(str(table))))
    after = old.search(queries, 5)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_allclose(before[0], after[0], rtol=0, atol=1e-6)


def test_an_index_rebuilt_from_nothing_is_followed(table):
    # Its generation numbers start again at 1: the service compares the generation's own tag.
    index.build_or_update(str(table))
    searcher = searcher_of(table)
    first = searcher.health()["index_generation"]
    shutil.rmtree(index.default_dir(str(table)))
    grow(table, 300, 20, "features-B-00000-of-00001.parquet")
    assert index.build_or_update(str(table)).action == "built"
    assert searcher.refresh() is True
    health = searcher.health()
    assert (first, health["index_generation"], health["rows"]) == (1, 1, 320)


def test_following_outlives_a_damaged_index_and_says_so(table):
    index.build_or_update(str(table))
    searcher = searcher_of(table)
    manifest = pathlib.Path(index.default_dir(str(table))) / "index.json"
    good = manifest.read_bytes()
    stop = threading.Event()
    follower = threading.Thread(target=searcher.follow, args=(0.02, stop))
    follower.start()

    def wait_for(condition, what):
        deadline = time.monotonic() + 20
        while not condition():
            assert follower.is_alive(), "the follower died"
            assert time.monotonic() < deadline, what
            time.sleep(0.02)

    try:
        manifest.write_bytes(
            b'{"format": 1, "generation": 7, "files": {"vectors": "vectors-x.npy"}}'
        )
        wait_for(lambda: "cannot be opened" in searcher.stale, "no word of the damaged index")
        assert searcher.health()["rows"] == 300 and follower.is_alive()
        manifest.unlink()
        wait_for(lambda: "holds no index.json now" in searcher.stale, "no word of index.json gone")
        manifest.write_bytes(good)
        wait_for(lambda: searcher.stale == "", "the served generation was not recognised")
        grow(table, 300, 30, "features-B-00000-of-00001.parquet")
        index.build_or_update(str(table))
        wait_for(lambda: searcher.health()["rows"] == 330, "the update was not followed")
    finally:
        stop.set()
        follower.join(10)


@pytest.mark.parametrize("kind", ["exact", "faiss"])
def test_searches_take_turns(table, kind, monkeypatch):
    # Concurrent searches thrash the cores (docs/performance.md): each kind runs one at a time.
    index.build_or_update(str(table), kind=kind)
    searcher = searcher_of(table)
    assert searcher.index.kind == kind
    active, most = [0], [0]
    real = searcher.index.search

    def counted(*args, **kwargs):
        active[0] += 1
        most[0] = max(most[0], active[0])
        time.sleep(0.005)  # long enough for the other threads to come in, were they let
        try:
            return real(*args, **kwargs)
        finally:
            active[0] -= 1

    monkeypatch.setattr(searcher.index, "search", counted)
    ids = [f"{i:032x}" for i in range(40)]
    threads = [
        threading.Thread(target=lambda part=part: [searcher.by_id(i, 5) for i in part])
        for part in (ids[0::4], ids[1::4], ids[2::4], ids[3::4])
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert most[0] == 1
