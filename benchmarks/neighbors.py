"""The neighbours benchmark (``python -m benchmarks --only neighbors``): all-rows k = 10
neighbours of a synthetic N x 1280 table, exact and through the faiss index, and recall@10.

Each step runs in its own process (peak RSS is its own):

1. ``nn-data`` synthesises the table in the job's 1,000-row shards: float32 vectors with
   hierarchical cluster structure, no labels. Each row is ReLU(shared + group + 0.7 subgroup +
   noise - 0.5) over 50 groups x 40 subgroups of standard normal directions (0.8 for the shared
   one): non-negative like pooled CNN features, with a random pair's cosine about 0.35 (ants/bees
   with MobileNetV2: 0.37) and a row's 10th neighbour at about 0.64 at 20k rows;
2. ``nn`` runs ``pipeline.neighbors`` on it with ``--index exact`` or ``--index faiss``, and says how
   long it took;
3. ``nn-recall`` compares the two neighbour tables of one size: recall@10 of the index.

Exact search is timed up to ``--nn-exact-max`` rows; past it its time is extrapolated from the
largest exact run (it grows with N squared) and labelled so.
"""

import time
from pathlib import Path

DIM = 1280
GROUPS = 50
SUBGROUPS = 40
K = 10
_METADATA = {"backbone": "synthetic", "feature_dim": str(DIM), "weights_fingerprint": "none"}


def measure_nn_data(args) -> dict:
    n = args.count
    out = Path(args.work) / f"nn-{n}"
    started = time.perf_counter()
    shards = write_table(out, n, _METADATA)
    return {"table": str(out), "shards": shards, "synth_s": time.perf_counter() - started}


def write_table(out: Path, n: int, metadata: dict[str, str]) -> int:
    """Writes the synthetic ``n``-row table (see the module) into ``out`` in the job's shards,
    with ``metadata`` as its recipe; returns the number of shards."""
    import numpy as np
    import pyarrow as pa

    from transforms import table
    from transforms.extract import DEFAULT_CHUNK_SIZE

    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shared = 0.8 * rng.standard_normal(DIM, dtype=np.float32)
    groups = rng.standard_normal((GROUPS, DIM), dtype=np.float32)
    subgroups = 0.7 * rng.standard_normal((GROUPS * SUBGROUPS, DIM), dtype=np.float32)
    schema = table.feature_schema(DIM, metadata)
    shards = -(-n // DEFAULT_CHUNK_SIZE)
    for s in range(shards):
        lo, hi = s * DEFAULT_CHUNK_SIZE, min(n, (s + 1) * DEFAULT_CHUNK_SIZE)
        rows = hi - lo
        members = rng.integers(0, GROUPS * SUBGROUPS, rows)
        noise = rng.standard_normal((rows, DIM), dtype=np.float32)
        vectors = shared + groups[members // SUBGROUPS] + subgroups[members] + noise
        vectors = np.maximum(vectors - 0.5, 0)
        ids = pa.array([f"{i:09d}" for i in range(lo, hi)], pa.string())
        piece = pa.table(
            {
                "image_id": ids,
                "uri": pa.array([f"gs://bucket/images/{i:09d}.jpg" for i in range(lo, hi)]),
                "label": pa.nulls(rows, pa.string()),
                "split": pa.nulls(rows, pa.string()),
                "width": pa.array(np.full(rows, 640, np.int32)),
                "height": pa.array(np.full(rows, 480, np.int32)),
                "file_size": pa.array(np.full(rows, 50_000, np.int64)),
                "file_version": pa.array(["1"] * rows, pa.string()),
                "feature": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), DIM),
            },
            schema=schema,
        )
        name = table.shard_name(table.FEATURES, s, shards, run_id="20260101T000000beef")
        table.write_parquet(str(out / name), piece)
    return shards


def measure_nn(args) -> dict:
    from pipeline.neighbors import run

    out = Path(args.work) / f"nn-out-{args.index}-{Path(args.table).name}"
    started = time.perf_counter()
    summary = run(
        ["--features", args.table, "--output", str(out), "--k", str(K), "--index", args.index]
    )
    return {
        "output": str(out),
        "rows": summary["rows"],
        "index": summary["index"],
        "job_s": time.perf_counter() - started,
    }


def measure_nn_recall(args) -> dict:
    import pyarrow.parquet as pq

    from transforms.neighbors_layout import NEIGHBOR_IDS, NEIGHBORS_FILE

    def found(folder):
        return pq.read_table(f"{folder}/{NEIGHBORS_FILE}", columns=[NEIGHBOR_IDS]).column(0)

    exact, approximate = found(args.table), found(args.input)
    hits = total = 0
    for a, b in zip(exact.to_pylist(), approximate.to_pylist(), strict=True):
        hits += len(set(a) & set(b))
        total += len(a)
    return {"recall": hits / total, "rows": len(exact)}


def measure_nn_recall_sampled(args) -> dict:
    """recall@10 of the index on ``--count`` random rows, against exact search for those rows
    alone (one pass over the table): for tables too large to search exactly in full."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from transforms.neighbors import FeatureShards, exact_search
    from transforms.neighbors_layout import IMAGE_ID, NEIGHBOR_IDS, NEIGHBORS_FILE

    shards = FeatureShards.open(args.table)
    rows = np.sort(np.random.default_rng(0).choice(len(shards), args.count, replace=False))
    exact, _ = exact_search(shards.rows_at(rows), shards.batches, K, self_rows=rows)
    ids = shards.ids.column("image_id")
    wanted = ids.take(rows)
    found = pq.read_table(f"{args.input}/{NEIGHBORS_FILE}", columns=[IMAGE_ID, NEIGHBOR_IDS])
    found = found.filter(pc.is_in(found.column(IMAGE_ID), wanted)).to_pydict()
    by_id = dict(zip(found[IMAGE_ID], found[NEIGHBOR_IDS], strict=True))
    hits = sum(
        len(set(ids.take(row).to_pylist()) & set(by_id[image_id]))
        for row, image_id in zip(exact, wanted.to_pylist(), strict=True)
    )
    return {"recall": hits / (K * len(rows)), "rows": len(rows)}


def report(sizes, exact_max: int, measure, work: Path) -> None:
    """Runs the neighbours section for each size and prints its figures."""
    print(
        f"\nneighbours: all rows, k={K}, synthetic {DIM}-d vectors in 1,000-row shards "
        "(exact: blocked matrix products; faiss: IVF + 4-bit PQ fast scan + 8-bit refine)"
    )
    print(
        f"  {'N':>10} {'exact s':>9} {'faiss s':>9} {'exact/faiss':>12} {'recall@10':>10} "
        f"{'exact MiB':>10} {'faiss MiB':>10}"
    )
    largest_exact = None
    for n in sizes:
        data = measure("nn-data", work, count=n)
        approx = measure("nn", work, table=data["table"], index="faiss")
        exact = None
        if n <= exact_max:
            exact = measure("nn", work, table=data["table"], index="exact")
            largest_exact = (n, exact["job_s"])
        if exact is not None:
            recall = measure("nn-recall", work, table=exact["output"], input=approx["output"])
            exact_s, exact_mb = f"{exact['job_s']:9.1f}", f"{exact['rss_mb']:10.0f}"
            ratio = f"{exact['job_s'] / approx['job_s']:11.2f}x"
            recall_s = f"{recall['recall']:10.4f}"
        elif largest_exact:
            guess = largest_exact[1] * (n / largest_exact[0]) ** 2
            exact_s, exact_mb = f"~{guess:8.0f}", f"{'-':>10}"
            ratio = f"~{guess / approx['job_s']:10.0f}x"
            sampled = measure(
                "nn-recall-sampled", work, table=data["table"], input=approx["output"], count=1000
            )
            recall_s = f"{sampled['recall']:9.4f}*"
        else:
            exact_s = ratio = recall_s = exact_mb = "-"
        print(
            f"  {n:>10,} {exact_s:>9} {approx['job_s']:9.1f} {ratio:>12} {recall_s:>10} "
            f"{exact_mb:>10} {approx['rss_mb']:10.0f}"
        )
        print(f"  {'':>10} (synthesised in {data['synth_s']:.0f} s, {data['shards']:,} shards)")
    if largest_exact:
        print(
            f"  ~ extrapolated from exact at {largest_exact[0]:,} rows (time grows with N^2); "
            "times are whole job runs: reading the table, search, writing neighbors.parquet; "
            "* recall on 1,000 random rows against exact search for them"
        )
