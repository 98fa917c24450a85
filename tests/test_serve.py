"""featurebeam serve: the API's contract, bad requests (and that the service keeps answering
after them), the upload limit, auth, CORS and binding; the real process on 127.0.0.1."""

from __future__ import annotations

import io
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from conftest import encode, gradient
from fastapi.testclient import TestClient
from PIL import Image

from pipeline import serve
from transforms import search_generations, table
from transforms.index import SearchIndex

BACKBONE = ["--backbone", "mobilenet_v2", "--weights", "none", "--image-size", "64"]


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """A real table of 12 labelled images (train/val x cats/dogs) and its images' folder."""
    from conftest import write_image_tree

    from pipeline.extract import run

    root = tmp_path_factory.mktemp("serve")
    write_image_tree(root / "images")
    run(["--input", str(root / "images"), "--output", str(root / "features"), "-q", *BACKBONE])
    return root / "features"


@pytest.fixture(scope="module")
def served(features):
    return serve.build(["--features", str(features)])


@pytest.fixture(scope="module")
def client(served):
    return TestClient(served["app"])


def rows(features) -> list[dict]:
    return table.read_table(str(features)).to_pylist()


def still_answers(client) -> None:
    assert client.get("/api/health").json()["status"] == "ok"


# --- the contract ---


def test_health_names_the_table_recipe_rows_and_searches(client, features):
    health = client.get("/api/health").json()
    assert health["rows"] == 12 and health["table"] == str(features)
    assert health["recipe"]["backbone"] == "mobilenet_v2"
    assert health["recipe"]["input_size"] == "64"
    assert health["image_search"] is True and health["text_search"] is False
    assert "no text tower" in health["text_search_unavailable"]
    assert (health["labels"], health["splits"]) == (["cats", "dogs"], ["train", "val"])


def test_search_by_id_equals_exact_cosine_search_best_first_without_itself(client, features):
    table_rows = rows(features)
    vectors = np.stack([r["feature"] for r in table_rows]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    query = 3
    want = np.argsort(-(vectors @ vectors[query]), kind="stable")
    want = [table_rows[i]["image_id"] for i in want if i != query][:5]
    results = client.get(f"/api/search?image_id={table_rows[query]['image_id']}&k=5").json()[
        "results"
    ]
    assert [r["image_id"] for r in results] == want
    assert set(results[0]) == {"image_id", "uri", "similarity", "label", "split"}
    sims = [r["similarity"] for r in results]
    assert sims == sorted(sims, reverse=True)
    by_id = {r["image_id"]: r for r in table_rows}
    for r in results:
        assert (r["uri"], r["label"], r["split"]) == tuple(
            by_id[r["image_id"]][c] for c in ("uri", "label", "split")
        )


def test_an_uploaded_table_image_finds_itself_first_with_similarity_one(client, features):
    row = rows(features)[5]
    data = pathlib.Path(row["uri"].removeprefix("file://")).read_bytes()
    results = client.post("/api/search", files={"image": ("a.png", data, "image/png")}).json()[
        "results"
    ]
    assert results[0]["image_id"] == row["image_id"]
    assert results[0]["similarity"] > 0.9999
    assert len(results) == 12  # k defaults to 20: every row


def test_filters_on_label_and_split_and_k(client, features):
    row = rows(features)[0]
    got = client.get(f"/api/search?image_id={row['image_id']}&k=2&label=cats&split=val").json()
    assert len(got["results"]) == 2
    assert all((r["label"], r["split"]) == ("cats", "val") for r in got["results"])
    data = pathlib.Path(row["uri"].removeprefix("file://")).read_bytes()
    upload = client.post(
        "/api/search", files={"image": ("a.png", data)}, data={"k": "3", "label": "dogs"}
    ).json()["results"]
    assert len(upload) == 3 and {r["label"] for r in upload} == {"dogs"}
    # A label or split no row has is a typo to name, not a search that found nothing.
    for query, said in (
        ("label=birds", "no row has label 'birds'; the table's: cats, dogs"),
        ("split=tset", "no row has split 'tset'; the table's: train, val"),
    ):
        answer = client.get(f"/api/search?image_id={row['image_id']}&{query}")
        assert (answer.status_code, answer.json()["detail"]) == (422, said)
    wrong = client.post("/api/search", files={"image": ("a.png", data)}, data={"label": "Cats"})
    assert wrong.status_code == 422 and "'Cats'" in wrong.json()["detail"]


def test_thumbnails_by_id_only(client, features):
    row = rows(features)[0]
    answer = client.get(f"/api/images/{row['image_id']}")
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(answer.content)).format == "JPEG"
    path = row["uri"].removeprefix("file://")
    for bad in (path, "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "nope"):
        assert client.get(f"/api/images/{bad}").status_code == 404, bad


def test_openapi_and_the_page(client):
    spec = client.get("/openapi.json").json()
    assert {"/api/health", "/api/search", "/api/images/{image_id}"} <= set(spec["paths"])
    assert {"get", "post"} <= set(spec["paths"]["/api/search"])
    page = client.get("/")
    assert page.status_code == 200 and "featurebeam search" in page.text


# --- bad requests: a 4xx that says why, and the service keeps answering ---


def bomb() -> bytes:
    """A small PNG whose header claims more pixels than Pillow's decompression-bomb limit."""
    image = Image.new("1", (20_000, 20_000))  # 1 bit per pixel: 50 MB in memory, tiny encoded
    return encode(image)


@pytest.mark.parametrize(
    ("data", "status", "reason"),
    [
        (b"this is not an image", 400, "not an image"),
        (encode(gradient(), "JPEG")[:300], 400, "runcated"),
        (b"", 400, "empty"),
        (None, 400, "too many pixels"),
    ],
    ids=["not-an-image", "truncated", "empty", "decompression-bomb"],
)
def test_a_bad_upload_is_400_with_its_reason(client, data, status, reason):
    data = bomb() if data is None else data
    answer = client.post("/api/search", files={"image": ("x.jpg", data, "image/jpeg")})
    assert answer.status_code == status, answer.text
    assert reason in answer.json()["detail"]
    still_answers(client)


@pytest.mark.parametrize(
    ("query", "status", "reason"),
    [
        ("image_id=nope", 404, "no image 'nope'"),
        ("image_id=x&k=0", 422, ""),
        ("image_id=x&k=1001", 422, ""),
        ("image_id=x&k=ten", 422, ""),
        ("", 422, "exactly one of image_id or text"),
        ("image_id=x&text=y", 422, "exactly one of image_id or text"),
        ("text=a+bee", 400, "no text tower"),
        ("text=+", 422, "text must not be empty"),
    ],
)
def test_bad_search_parameters(client, query, status, reason):
    answer = client.get(f"/api/search?{query}")
    assert answer.status_code == status, answer.text
    assert reason in str(answer.json()["detail"])
    still_answers(client)


def test_a_post_without_the_image_field_is_422(client):
    assert client.post("/api/search", data={"k": "3"}).status_code == 422
    still_answers(client)


def test_an_upload_over_the_limit_is_413_from_its_length_before_it_is_read(features):
    app = serve.build(["--features", str(features), "--max-upload-mb", "0.01"], load_model=False)
    client = TestClient(app["app"])
    small = encode(gradient(), "PNG")
    big = os.urandom(20_000)
    answer = client.post("/api/search", files={"image": ("x.png", big)})
    assert answer.status_code == 413 and "10,485 bytes" in answer.json()["detail"]
    assert client.post("/api/search", files={"image": ("x.png", small)}).status_code != 413


def test_a_body_without_content_length_is_cut_off_once_it_passes_the_limit():
    """A chunked upload is refused as soon as it has sent more than the limit: the app never
    reads the rest (ASGI-level, so no client buffers the body first)."""
    import asyncio

    from transforms.search_app import _UploadLimit

    async def reads_everything(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def exchange(chunks: int, size: int) -> tuple[int, int]:
        sent, answered = [], []

        async def receive():
            sent.append(size)
            return {"type": "http.request", "body": b"x" * size, "more_body": len(sent) < chunks}

        async def send(message):
            if message["type"] == "http.response.start":
                answered.append(message["status"])

        scope = {"type": "http", "method": "POST", "headers": [], "path": "/api/search"}
        asyncio.run(_UploadLimit(reads_everything, 10_000)(scope, receive, send))
        return answered[0], len(sent)

    assert exchange(1000, 4096) == (413, 3)  # 12,288 bytes > 10,000: stopped at the third
    assert exchange(2, 4096) == (200, 2)  # 8,192 bytes: within the limit


# --- auth, CORS, binding ---


def test_a_token_is_asked_for_every_route_but_the_openapi_description(features):
    app = serve.build(["--features", str(features), "--token", "s3cret"], load_model=False)
    client = TestClient(app["app"])
    for path in ("/api/health", "/api/search?image_id=x", "/api/images/x", "/"):
        answer = client.get(path)
        assert answer.status_code == 401, path
        assert "token" in answer.json()["detail"]
    wrong = client.get("/api/health", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert client.get("/api/health", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/openapi.json").status_code == 200
    # The page opened with ?token= sets a cookie its own requests carry.
    assert client.get("/api/health?token=s3cret").status_code == 401  # only the page takes it
    page = client.get("/?token=s3cret")
    assert page.status_code == 200 and "featurebeam_token" in page.headers["set-cookie"]
    assert "httponly" in page.headers["set-cookie"].lower()
    assert client.get("/api/health").status_code == 200  # the cookie


@pytest.mark.parametrize(
    ("flags", "ok"),
    [
        (["--host", "0.0.0.0"], False),
        (["--host", "192.168.1.5"], False),
        (["--host", "0.0.0.0", "--token", "t"], True),
        (["--host", "0.0.0.0", "--no-auth"], True),
        (["--host", "127.0.0.1"], True),
        (["--host", "localhost"], True),
    ],
)
def test_binding_beyond_loopback_needs_a_token_or_no_auth(features, flags, ok, monkeypatch):
    monkeypatch.delenv(serve.TOKEN_ENV, raising=False)
    argv = ["--features", str(features), *flags]
    if ok:
        serve.build(argv, load_model=False)
    else:
        with pytest.raises(ValueError, match="--token SECRET .* or --no-auth"):
            serve.build(argv, load_model=False)


def test_the_token_may_come_from_the_environment(features, monkeypatch):
    monkeypatch.setenv(serve.TOKEN_ENV, "from-env")
    app = serve.build(["--features", str(features), "--host", "0.0.0.0"], load_model=False)
    client = TestClient(app["app"])
    assert client.get("/api/health").status_code == 401
    ok = client.get("/api/health", headers={"Authorization": "Bearer from-env"})
    assert ok.status_code == 200


def test_no_cors_unless_asked(features):
    origin = {"Origin": "https://elsewhere.example"}
    plain = TestClient(serve.build(["--features", str(features)], load_model=False)["app"])
    assert "access-control-allow-origin" not in plain.get("/api/health", headers=origin).headers
    argv = ["--features", str(features), "--cors-origin", "https://elsewhere.example"]
    allowed = TestClient(serve.build(argv, load_model=False)["app"])
    answer = allowed.get("/api/health", headers=origin)
    assert answer.headers["access-control-allow-origin"] == "https://elsewhere.example"
    other = allowed.get("/api/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


# --- the index follows the table ---


def test_serve_builds_a_missing_index_and_updates_a_stale_one(features, tmp_path):
    index_dir = tmp_path / "idx"
    first = serve.build(["--features", str(features), "--index", str(index_dir)], load_model=False)
    assert first["update"].action == "built" and len(SearchIndex.open(str(index_dir))) == 12
    again = serve.build(["--features", str(features), "--index", str(index_dir)], load_model=False)
    assert again["update"].action == "unchanged"
    missing = ["--features", str(tmp_path / "nothing")]
    with pytest.raises(FileNotFoundError, match="--features"):
        serve.build(missing, load_model=False)


def _extract(images, out, *flags):
    from pipeline.extract import run

    run(["--input", str(images), "--output", str(out), "-q", *BACKBONE, *flags])


def test_a_running_service_follows_the_index_after_an_incremental_run(tmp_path):
    """Once `featurebeam index` commits an update, the running service searches the new rows,
    forgets the pruned ones and serves no thumbnail of them; the cause of a thumbnail that
    cannot be read stays in the server's log."""
    from conftest import write_image_tree

    images, out = tmp_path / "images", tmp_path / "features"
    write_image_tree(images)
    _extract(images, out)
    served = serve.build(["--features", str(out)], load_model=False)
    searcher, client = served["searcher"], TestClient(served["app"])
    first = client.get("/api/health").json()
    assert (first["rows"], first["index_generation"], first["index_stale"]) == (12, 1, "")
    assert searcher.refresh() is False  # nothing committed since

    gone = images / "train" / "dogs" / "1.jpg"
    gone_id = next(r["image_id"] for r in rows(out) if r["uri"].endswith("train/dogs/1.jpg"))
    gone.unlink()
    answer = client.get(f"/api/images/{gone_id}")  # still in the served index, file deleted
    assert answer.status_code == 404 and str(tmp_path) not in answer.json()["detail"]
    for i in range(2):
        (images / "val" / "cats" / f"new{i}.png").write_bytes(encode(gradient(seed=70 + i)))
    _extract(images, out, "--mode", "incremental", "--prune")
    assert client.get("/api/health").json()["rows"] == 12  # not until the index is updated
    assert serve.indexes.build_or_update(str(out)).action == "updated"

    stop = threading.Event()
    follower = threading.Thread(target=searcher.follow, args=(0.05, stop))
    follower.start()
    try:
        deadline = time.monotonic() + 20
        while client.get("/api/health").json()["index_generation"] == 1:
            assert time.monotonic() < deadline, "the service did not follow the index in 20 s"
            time.sleep(0.05)
    finally:
        stop.set()
        follower.join(10)
    health = client.get("/api/health").json()
    assert (health["rows"], health["index_generation"]) == (13, 2)
    new_id = next(r["image_id"] for r in rows(out) if r["uri"].endswith("val/cats/new1.png"))
    found = client.get(f"/api/search?image_id={new_id}&k=20").json()["results"]
    assert len(found) == 12 and gone_id not in {r["image_id"] for r in found}
    assert client.get(f"/api/search?image_id={gone_id}").status_code == 404
    assert client.get(f"/api/images/{new_id}").status_code == 200


def test_an_index_rebuilt_for_another_recipe_is_not_served_by_the_old_model(tmp_path, monkeypatch):
    from conftest import write_image_tree

    images, out = tmp_path / "images", tmp_path / "features"
    write_image_tree(images)
    _extract(images, out)
    served = serve.build(["--features", str(out)], load_model=False)
    searcher, client = served["searcher"], TestClient(served["app"])
    _extract(images, out, "--pooling", "max", "--overwrite")
    assert serve.indexes.build_or_update(str(out)).action == "rebuilt"
    opened = []
    real_open = search_generations.SearchIndex.open
    monkeypatch.setattr(
        search_generations.SearchIndex, "open", lambda d: opened.append(d) or real_open(d)
    )
    assert searcher.refresh() is False and searcher.refresh() is False
    assert opened == []  # refused from its index.json, and not read again
    health = client.get("/api/health").json()
    assert health["index_generation"] == 1 and health["recipe"]["pooling"] == "avg"
    assert "rebuilt for another recipe (generation 2)" in health["index_stale"]
    assert "restarted" in health["index_stale"]
    # Rebuilt again for the served recipe: followed, and the word taken back.
    _extract(images, out, "--pooling", "avg", "--overwrite")
    assert serve.indexes.build_or_update(str(out)).action == "rebuilt"
    assert searcher.refresh() is True
    health = client.get("/api/health").json()
    assert (health["index_generation"], health["index_stale"]) == (3, "")


def test_no_update_serves_the_index_as_it_is_and_says_it_is_behind(tmp_path):
    from conftest import write_image_tree

    images, out = tmp_path / "images", tmp_path / "features"
    write_image_tree(images)
    _extract(images, out)
    serve.indexes.build_or_update(str(out))
    fresh = serve.build(["--features", str(out), "--no-update"], load_model=False)
    assert fresh["behind"] == "" and "NOT up to date" not in serve.describe(fresh)
    (images / "val" / "cats" / "new.png").write_bytes(encode(gradient(seed=90)))
    _extract(images, out, "--mode", "incremental")
    stale = serve.build(["--features", str(out), "--no-update"], load_model=False)
    assert stale["searcher"].health()["rows"] == 12
    assert stale["behind"].startswith("the table changed since the index was updated (1 shard")
    assert "NOT up to date: the table changed" in serve.describe(stale)


def test_a_port_in_use_is_one_line_before_anything_loads(features, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("the service was built for a port it cannot bind")

    monkeypatch.setattr(serve, "build", never)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as stop:
            serve.main(["--features", str(features), "--port", str(port)])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"cannot listen on 127.0.0.1:{port}: in use" in err


@pytest.mark.parametrize(("flags", "following"), [([], True), (["--reload-every", "0"], False)])
def test_the_service_starts_following_the_index_unless_told_not_to(
    features, monkeypatch, flags, following
):
    import functools

    import uvicorn

    seen = {}

    def serving(app, **kwargs):
        seen["threads"] = {t.name for t in threading.enumerate() if t.is_alive()}

    monkeypatch.setattr(uvicorn, "run", serving)
    monkeypatch.setattr(serve, "build", functools.partial(serve.build, load_model=False))
    serve.run(["--features", str(features), "--port", str(_free_port()), *flags])
    assert ("follow-index" in seen["threads"]) is following
    assert "follow-index" not in {t.name for t in threading.enumerate() if t.is_alive()}


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_reload_every_must_be_a_number_of_seconds(features, value):
    with pytest.raises(ValueError, match="--reload-every must be 0"):
        serve.build(["--features", str(features), "--reload-every", value], load_model=False)


# --- the real process ---


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def process(features):
    """``featurebeam serve`` in its own process on 127.0.0.1; always stopped."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.serve", "--features", str(features), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{base}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the service did not start in 120 s"
            time.sleep(0.2)
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_the_real_process_answers_and_bounds_memory_under_a_burst_of_large_uploads(
    process, features
):
    """Twelve concurrent 8 MB uploads (a large photo each), then a burst over the limit: every
    answer is an answer, the server's memory grows by far less than the bytes sent, and it still
    answers searches afterwards."""
    import psutil

    base, proc = process
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (2400, 3200, 3), dtype=np.uint8))
    large = encode(photo, "JPEG", quality=95)
    assert len(large) > 5 * 2**20
    server = psutil.Process(proc.pid)
    before = server.memory_info().rss
    peak = [before]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], server.memory_info().rss)
            time.sleep(0.02)

    statuses = []

    def upload(data):
        answer = httpx.post(f"{base}/api/search", files={"image": ("p.jpg", data)}, timeout=120)
        statuses.append(answer.status_code)

    sampler = threading.Thread(target=sample)
    sampler.start()
    oversized = os.urandom(21 * 2**20)
    threads = [threading.Thread(target=upload, args=(large,)) for _ in range(12)]
    threads += [threading.Thread(target=upload, args=(oversized,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    stop.set()
    sampler.join()
    assert sorted(statuses) == [200] * 12 + [413] * 4
    sent = 12 * len(large) + 4 * len(oversized)
    grown = (peak[0] - before) / 2**20
    assert grown < 600, f"server grew {grown:.0f} MiB for {sent / 2**20:.0f} MiB sent"
    row = rows(features)[0]
    answer = httpx.get(f"{base}/api/search?image_id={row['image_id']}&k=3", timeout=30)
    assert answer.status_code == 200 and len(answer.json()["results"]) == 3
