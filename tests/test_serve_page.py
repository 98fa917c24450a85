"""The search page in headless Chromium, against the real service on 127.0.0.1, and search by
words on a CLIP table (a tiny preset with its own tokenizer, written here: offline)."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hub_checkpoints import write_clip_preset_with_tokenizer
from PIL import Image
from test_report import _browser
from test_serve import _free_port

from pipeline import serve
from transforms import table


def _serving(argv):
    """``featurebeam serve`` in this process's thread on a free port (uvicorn, for real)."""
    import threading

    import uvicorn

    served = serve.build(argv)
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(served["app"], host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


def _results(browser, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, timeout).until(
        lambda b: (
            b.execute_script("return document.querySelectorAll('.hit').length") > 0
            or "error" in b.find_element("id", "status").get_attribute("class")
        )
    )
    return browser.execute_script(
        "return Array.from(document.querySelectorAll('.hit')).map(h => h.dataset.imageId)"
    )


@pytest.mark.slow
def test_the_page_finds_a_photo_from_a_resized_reencoded_copy(
    hymenoptera, sample_weights, tmp_path
):
    """Real ants/bees photos and real weights: a half-size, JPEG-re-encoded copy of a photo
    dropped on the page finds its original first; clicking a result searches from it; every
    thumbnail loads; no console error. The screenshot is the docs' (docs/search.jpg)."""
    from pipeline.extract import run as extract

    features = tmp_path / "features"
    extract(
        ["--input", str(hymenoptera / "val"), "--output", str(features), "-q"]
        + ["--backbone", "mobilenet_v2", "--weights", "sample"]
    )
    rows = table.read_table(str(features)).to_pylist()
    original = next(r for r in rows if r["label"] == "bees")
    photo = Image.open(original["uri"].removeprefix("file://")).convert("RGB")
    photo = photo.resize((photo.width // 2, photo.height // 2), Image.Resampling.BILINEAR)
    copy = tmp_path / "copy.jpg"
    photo.save(copy, format="JPEG", quality=70)

    server, thread, base = _serving(["--features", str(features)])
    browser = _browser()
    try:
        browser.get(base + "/")
        browser.find_element("id", "file").send_keys(str(copy))
        found = _results(browser)
        assert found and found[0] == original["image_id"], found[:3]
        status = browser.find_element("id", "status").text
        assert "results for copy.jpg" in status
        text_box_hidden = browser.execute_script("return document.getElementById('textbox').hidden")
        # Clicking the second result searches from it: a new grid, led by its nearest neighbour.
        second = found[1]
        browser.find_element("css selector", f".hit[data-image-id='{second}']").click()
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(browser, 30).until(
            lambda b: f"image {second}" in b.find_element("id", "status").text
        )
        clicked = _results(browser)
        assert second not in clicked and len(clicked) == 20
        WebDriverWait(browser, 30).until(
            lambda b: b.execute_script(
                "return Array.from(document.querySelectorAll('.hit img'))"
                ".every(i => i.complete && i.naturalWidth > 0)"
            )
        )
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        browser.save_screenshot(str(tmp_path / "search.png"))
    finally:
        browser.quit()
        server.should_exit = True
        thread.join(30)
    assert errors == []
    assert text_box_hidden is True  # MobileNetV2 has no text tower
    shot = Image.open(tmp_path / "search.png")
    assert shot.width >= 1000
    shot.convert("RGB").save(tmp_path / "search.jpg", quality=80)


@pytest.fixture(scope="module")
def clip_table(tmp_path_factory):
    from conftest import write_image_tree

    from pipeline.extract import run as extract

    root = tmp_path_factory.mktemp("clip")
    preset = write_clip_preset_with_tokenizer(root / "clip")
    write_image_tree(root / "images")
    extract(
        ["--input", str(root / "images"), "--output", str(root / "features"), "-q"]
        + ["--backbone", "clip_vit_base_patch16", "--weights", str(preset)]
    )
    return root / "features", preset


@pytest.mark.slow
def test_text_search_ranks_rows_by_the_text_towers_cosine(clip_table):
    """Words are embedded by the preset's own tokenizer and text tower: the similarities are
    the cosines between that embedding and the table's vectors, best first."""
    import keras
    import keras_hub

    features, preset = clip_table
    client = TestClient(serve.build(["--features", str(features)])["app"])
    health = client.get("/api/health").json()
    assert health["text_search"] is True, health
    results = client.get("/api/search?text=a+bee&k=5").json()["results"]
    backbone = keras_hub.models.CLIPBackbone.from_preset(str(preset))
    preprocessor = keras_hub.models.CLIPPreprocessor.from_preset(str(preset))
    tokens = preprocessor({"prompts": ["a bee"], "images": None})["token_ids"]
    text = keras.ops.convert_to_numpy(backbone.get_text_embeddings(tokens))[0]
    rows = table.read_table(str(features)).to_pylist()
    vectors = np.stack([r["feature"] for r in rows])
    cosines = vectors @ text / np.linalg.norm(vectors, axis=1) / np.linalg.norm(text)
    order = np.argsort(-cosines, kind="stable")[:5]
    assert [r["image_id"] for r in results] == [rows[i]["image_id"] for i in order]
    np.testing.assert_allclose([r["similarity"] for r in results], cosines[order], atol=1e-4)
    empty = client.get("/api/search?text=+++")
    assert empty.status_code == 422


@pytest.mark.slow
def test_the_page_searches_by_words_on_a_text_capable_table(clip_table):
    features, _ = clip_table
    server, thread, base = _serving(["--features", str(features)])
    browser = _browser()
    try:
        browser.get(base + "/")
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(browser, 30).until(
            lambda b: not b.execute_script("return document.getElementById('textbox').hidden")
        )
        box = browser.find_element("id", "text")
        box.send_keys("a bee\n")
        found = _results(browser)
        status = browser.find_element("id", "status").text
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        browser.quit()
        server.should_exit = True
        thread.join(30)
    assert len(found) == 12 and "results for “a bee”" in status
    assert errors == []


def test_thumbnail_is_a_small_jpeg(tmp_path):
    from transforms.search import THUMBNAIL_SIDE, _thumbnail

    big = Image.new("RGB", (1200, 800), (200, 30, 40))
    data = io.BytesIO()
    big.save(data, format="PNG")
    thumb = Image.open(io.BytesIO(_thumbnail(data.getvalue(), 10**8)))
    assert thumb.format == "JPEG" and max(thumb.size) == THUMBNAIL_SIDE
