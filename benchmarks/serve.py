"""The search service's benchmark (``python -m benchmarks --only serve``): latency and throughput
of ``featurebeam serve`` on 127.0.0.1, under a bounded load generator, in one run.

1. ``serve-table``: a real table of the input images (``featurebeam extract``, MobileNetV2 with
   the sample weights), for the uploads, and its recipe;
2. ``serve-data``: synthetic tables of ``--serve-sizes`` rows (the neighbours section's vectors,
   :func:`benchmarks.neighbors.write_table`) with that recipe, so that the service loads the real
   model as it would for a real table of that size;
3. ``serve-load``: per table and index kind (``exact``, ``faiss``), ``featurebeam index`` then
   ``featurebeam serve`` in its own process, and a load generator in this one: ``--serve-requests``
   by-id searches (k = 10, ids drawn with a fixed seed) from ``--serve-clients`` threads, each
   with its own keep-alive connection; every request has a timeout and the whole run a deadline,
   so the generator always stops. Latency is measured per request by the client (connect, send,
   server, read); the server's peak RSS is sampled during the run;
4. uploads: the same against the real table with ``POST /api/search`` of a photo (as a user's
   browser sends it), beside the model's own cost for that one image in a plain process: the
   pipeline's decode and preprocessing and one model call at batch 1, median of 30, model
   loaded and warm (``serve-limit``).
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from benchmarks import neighbors

K = 10
#: Every request's own timeout, and the load generator's whole deadline, in seconds.
REQUEST_TIMEOUT_S = 30
DEADLINE_S = 300
_WARMUP = 20


def _featurebeam(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.console", *args]


def measure_serve_table(args) -> dict:
    out = Path(args.work) / "serve-real"
    started = time.perf_counter()
    argv = ["extract", "--input", args.input, "--output", str(out), "-q"]
    argv += ["--backbone", args.backbone, "--weights", args.weights]
    subprocess.run(_featurebeam(*argv), check=True, capture_output=True, text=True)
    from transforms import table

    first = table.shard_files(str(out))[0]
    import pyarrow.parquet as pq

    metadata = table.table_metadata(pq.read_schema(first))
    return {"table": str(out), "metadata": metadata, "extract_s": time.perf_counter() - started}


def measure_serve_data(args) -> dict:
    metadata = json.loads(Path(args.input).read_text())
    out = Path(args.work) / f"serve-{args.count}"
    started = time.perf_counter()
    shards = neighbors.write_table(out, args.count, metadata)
    return {"table": str(out), "shards": shards, "synth_s": time.perf_counter() - started}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Server:
    """``featurebeam serve`` in its own process on 127.0.0.1; always stopped on exit."""

    def __init__(self, table: str, index: str):
        self.port = _free_port()
        argv = ["serve", "--features", table, "--index", index, "--port", str(self.port), "-q"]
        argv += ["--no-update"]  # the index was just built
        self.proc = subprocess.Popen(
            _featurebeam(*argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.peak_rss_mb = 0.0
        self._stop = threading.Event()

    def __enter__(self) -> _Server:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"serve exited {self.proc.returncode}: {self.proc.stderr.read()}"
                )
            try:
                status, _ = _request(self._connect(), "GET", "/api/health")
                if status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            raise RuntimeError("serve did not answer /api/health within 180 s")
        threading.Thread(target=self._sample, daemon=True).start()
        return self

    def _sample(self) -> None:
        import psutil

        proc = psutil.Process(self.proc.pid)
        while not self._stop.is_set():
            try:
                self.peak_rss_mb = max(self.peak_rss_mb, proc.memory_info().rss / 2**20)
            except psutil.Error:
                return
            time.sleep(0.05)

    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT_S)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def load(self, requests: list[tuple[str, str, bytes | None, dict]], clients: int) -> dict:
        """Sends ``requests`` (method, path, body, headers) from ``clients`` threads, each on
        its own keep-alive connection; returns latency percentiles, rate and errors."""
        for method, path, body, headers in requests[:_WARMUP]:
            _request(self._connect(), method, path, body, headers)
        latencies: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()
        queue = iter(requests)
        deadline = time.monotonic() + DEADLINE_S

        def client() -> None:
            conn = self._connect()
            while time.monotonic() < deadline:
                with lock:
                    item = next(queue, None)
                if item is None:
                    return
                started = time.perf_counter()
                try:
                    status, _ = _request(conn, *item)
                except OSError as exc:
                    status, conn = f"{type(exc).__name__}", self._connect()
                took = time.perf_counter() - started
                with lock:
                    latencies.append(took)
                    if status != 200:
                        errors.append(str(status))

        started = time.perf_counter()
        threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(DEADLINE_S + REQUEST_TIMEOUT_S)
        wall = time.perf_counter() - started
        import numpy as np

        ms = np.array(latencies) * 1000
        return {
            "requests": len(latencies),
            "unsent": len(requests) - len(latencies),
            "errors": len(errors),
            "error_kinds": sorted(set(errors))[:5],
            "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)),
            "per_s": len(latencies) / wall,
            "server_rss_mb": self.peak_rss_mb,
        }


def _request(conn, method, path, body=None, headers=None) -> tuple[int, bytes]:
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    return response.status, response.read()


def _multipart(name: str, data: bytes) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def measure_serve_load(args) -> dict:
    import numpy as np
    import pyarrow.parquet as pq

    from transforms import table

    index = f"{args.table}/_index-{args.index}"
    started = time.perf_counter()
    subprocess.run(
        _featurebeam("index", "--features", args.table, "--index", index, "--kind", args.index),
        check=True,
        capture_output=True,
        text=True,
    )
    index_s = time.perf_counter() - started
    with _Server(args.table, index) as server:
        if args.large:  # uploads of this photo
            body, headers = _multipart(Path(args.large).name, Path(args.large).read_bytes())
            requests = [("POST", f"/api/search?k={K}", body, headers)] * args.count
        else:
            ids = pq.read_table(
                table.table_dir_for(args.table, table.FEATURES), columns=["image_id"]
            )
            ids = ids.column(0).to_pylist()
            picks = np.random.default_rng(0).choice(len(ids), args.count)
            requests = [("GET", f"/api/search?image_id={ids[i]}&k={K}", None, {}) for i in picks]
        result = server.load(requests, args.processes)
    return {**result, "index_s": index_s}


def measure_serve_limit(args) -> dict:
    """One image's decode + preprocessing + model call (batch 1) with the pipeline's own code,
    the model loaded and warm: what an upload cannot cost less than."""
    import numpy as np
    import pyarrow.parquet as pq

    from transforms import table
    from transforms.embed.handler import BackboneModelHandler
    from transforms.images import Target, load_images
    from transforms.models.recipe import FeatureRecipe

    metadata = table.table_metadata(pq.read_schema(table.shard_files(args.table)[0]))
    handler = BackboneModelHandler(FeatureRecipe.from_metadata(metadata), batch_size=1)
    target = Target(tuple(handler.input_size), handler.resize, handler.interpolation)
    embedder = handler.load_model()
    data = Path(args.large).read_bytes()

    def once() -> float:
        started = time.perf_counter()
        image = load_images(data, [target])[0]
        embedder(image.pixels[None])
        return time.perf_counter() - started

    for _ in range(3):
        once()
    times = [once() for _ in range(30)]
    return {"median_ms": float(np.median(times) * 1000)}


MEASURES = {
    "serve-table": measure_serve_table,
    "serve-data": measure_serve_data,
    "serve-load": measure_serve_load,
    "serve-limit": measure_serve_limit,
}


def _row(name: str, rows: int, kind: str, r: dict) -> str:
    return (
        f"  {name:<14} {rows:>8,} {kind:>6} {r['requests']:>6} {r['p50_ms']:>7.1f} "
        f"{r['p99_ms']:>7.1f} {r['per_s']:>7.1f} {r['errors']:>6} {r['server_rss_mb']:>8.0f}"
    )


def report(args, inputs: str, photo: str, measure, work: Path) -> None:
    """Runs the service section and prints its table."""
    weights = args.weights or "sample"
    real = measure("serve-table", work, input=inputs, backbone="mobilenet_v2", weights=weights)
    recipe = work / "serve-recipe.json"
    recipe.write_text(json.dumps(real["metadata"]))
    clients = args.serve_clients
    print(
        f"\nsearch service: featurebeam serve on 127.0.0.1, {clients} client threads with "
        f"keep-alive connections, k={K}, MobileNetV2 ({weights} weights) loaded in the server"
    )
    print(
        f"  {'query':<14} {'rows':>8} {'index':>6} {'reqs':>6} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'req/s':>7} {'errors':>6} {'RSS MiB':>8}"
    )
    for n in args.serve_sizes:
        data = measure("serve-data", work, input=recipe, count=n)
        for kind in ("exact", "faiss"):
            r = measure(
                "serve-load",
                work,
                table=data["table"],
                index=kind,
                count=args.serve_requests,
                processes=clients,
                weights=weights,
            )
            print(_row("by id", n, kind, r))
    rows = len(_ids(real["table"]))
    uploads = {}
    for n_clients in sorted({1, clients}):
        uploads[n_clients] = measure(
            "serve-load",
            work,
            table=real["table"],
            index="exact",
            count=max(20, args.serve_requests // 20),
            processes=n_clients,
            weights=weights,
            large=photo,
        )
        print(_row(f"upload, {n_clients} cl.", rows, "exact", uploads[n_clients]))
    limit = measure("serve-limit", work, table=real["table"], weights=weights, large=photo)
    size = Path(photo).stat().st_size / 1024
    alone, busy = uploads[1], uploads[max(uploads)]
    print(
        f"  an upload of {Path(photo).name} ({size:.0f} KiB): decode + model alone (batch 1, one "
        f"process, warm) {limit['median_ms']:.1f} ms median; through the service, one client: "
        f"p50 {alone['p50_ms']:.1f} ms ({alone['p50_ms'] / limit['median_ms']:.2f}x); "
        f"{max(uploads)} clients: {1000 / busy['per_s']:.1f} ms of server time per upload "
        f"({1000 / busy['per_s'] / limit['median_ms']:.2f}x; model calls take turns, so each "
        "waits for the others)"
    )
    print(
        "  latency is per request at the client (send, server, read); errors are non-200 "
        "answers or failed connections (goal 0); RSS is the server's peak during the run"
    )


def _ids(table_dir: str) -> list[str]:
    from transforms import table

    return table.read_table(table_dir).column("image_id").to_pylist()
