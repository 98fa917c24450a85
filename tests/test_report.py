"""The report page: what it holds, its bad inputs, and the page opened in a real headless browser."""

import json
import re
import shutil

import numpy as np
import pytest
from conftest import encode, gradient
from test_neighbors import clustered, write_vector_table

from pipeline import report
from transforms import table


def _facts(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page)
    return json.loads(match.group(1))


@pytest.fixture
def small_table(tmp_path):
    """60 rows whose first 20 URIs are real PNGs, 2 labels x 2 splits, one error row."""
    x, labels = clustered(n=60, clusters=2)
    (tmp_path / "img").mkdir()
    uris = []
    for i in range(60):
        path = tmp_path / "img" / f"{i}.png"
        if i < 20:
            path.write_bytes(encode(gradient(50, 40, seed=i)))
        uris.append(str(path))
    splits = ["train" if i % 3 else "val" for i in range(60)]
    recipe = {"backbone": "mobilenet_v2", "pooling": "avg", "input_size": "160"}
    write_vector_table(tmp_path / "t", x, labels, splits, metadata=recipe, uris=uris)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    error = {
        "image_id": "e0",
        "uri": str(tmp_path / "broken.jpg"),
        "stage": "decode",
        "reason": "cannot identify image file <b>",
        "file_size": 12,
        "file_version": "1",
    }
    table.write_parquet(
        str(tmp_path / "t" / "_errors" / "errors-00000-of-00001.parquet"),
        table.to_arrow([error], table.ERROR_SCHEMA),
    )
    return tmp_path / "t"


def test_report_holds_every_section(small_table, tmp_path):
    out = tmp_path / "report.html"
    summary = report.run(["--features", str(small_table), "--output", str(out)])
    page = out.read_text()
    assert summary["rows"] == 60 and summary["map_points"] == 60 and summary["strips"] == 12
    assert _facts(page) == {"rows": 60, "map_points": 60, "strips": 12, "groups": 0}
    for anchor in ("recipe", "errors", "distribution", "map", "neighbours"):
        assert f'<section id="{anchor}">' in page
    assert "duplicates" not in re.findall(r'<section id="(\w+)"', page)  # no --neighbors
    assert "cannot identify image file &lt;b&gt;" in page  # escaped
    assert "mobilenet_v2" in page and "All 60 rows." in page
    # Self-contained: Plotly inlined, nothing fetched, thumbnails as data URIs.
    markup = re.sub(r"<script[^>]*>.*?</script>", "", page, flags=re.S)
    assert not re.search(r'(src|href)="(https?:)?//', markup)
    assert "<script src=" not in page
    assert "Plotly.newPlot" in page and "cdn.plot.ly" not in markup
    thumbs = re.findall(r'<img src="data:image/jpeg;base64,', page)
    assert thumbs and len(thumbs) == page.count("<img ")
    assert page.count("no thumbnail") >= 1  # the broken file and the missing ones


def test_report_samples_the_map_and_says_so(small_table, tmp_path):
    out = tmp_path / "r.html"
    summary = report.run(
        ["--features", str(small_table), "--output", str(out), "--max-points", "25"]
    )
    assert summary["map_points"] == 25
    assert "A random sample of 25 of the 60 rows" in out.read_text()


def test_report_with_neighbours_and_duplicates(small_table, tmp_path):
    from pipeline.neighbors import run as neighbors

    neighbors(["--features", str(small_table), "--output", str(tmp_path / "nn")])
    neighbors(
        ["--features", str(small_table), "--output", str(tmp_path / "nn2")]
        + ["--duplicates", "0.5"]
    )
    out = tmp_path / "r.html"
    summary = report.run(
        ["--features", str(small_table), "--output", str(out), "--neighbors", str(tmp_path / "nn2")]
    )
    page = out.read_text()
    assert (
        summary["groups"] > 0 and "crosses splits" in page and '<section id="duplicates">' in page
    )
    report.run(
        ["--features", str(small_table), "--output", str(out), "--neighbors", str(tmp_path / "nn")]
        + ["--overwrite"]  # the page exists: replacing it is asked for
    )
    assert "run it with --duplicates" in out.read_text()


def test_report_bad_inputs(small_table, tmp_path, capsys):
    from pipeline.neighbors import run as neighbors

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no feature table here"):
        report.run(["--features", str(empty), "--output", str(tmp_path / "r.html")])
    with pytest.raises(FileNotFoundError, match="not a train_head --model-dir"):
        report.run(
            ["--features", str(small_table), "--output", str(tmp_path / "r.html")]
            + ["--head", str(empty)]
        )
    x, labels = clustered(n=30)
    write_vector_table(tmp_path / "other", x, labels)
    report.run(["--features", str(tmp_path / "other"), "--output", str(tmp_path / "o.html")])
    assert "(no split)" in (tmp_path / "o.html").read_text()  # unsplit rows are drawn, named
    neighbors(["--features", str(tmp_path / "other"), "--output", str(tmp_path / "nn")])
    with pytest.raises(ValueError, match="neighbours of another recipe's table"):
        report.run(
            ["--features", str(small_table), "--output", str(tmp_path / "r.html")]
            + ["--neighbors", str(tmp_path / "nn")]
        )
    with pytest.raises(ValueError, match="not a pipeline.neighbors --output folder"):
        report.run(
            ["--features", str(small_table), "--output", str(tmp_path / "r.html")]
            + ["--neighbors", str(empty)]
        )
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        report.main(["--features", str(empty), "--output", str(tmp_path / "r.html")])
    assert exit_.value.code == 2
    assert re.fullmatch(r"error: .*no feature table here.*\n", capsys.readouterr().err)


# --- in a real browser --------------------------------------------------------------------------

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
DRIVER = "chromedriver"


def _browser():
    """Headless Chromium through chromium-driver (Selenium), or skip saying what is missing."""
    binary = next((shutil.which(name) for name in CHROMIUM if shutil.which(name)), None)
    driver = shutil.which(DRIVER)
    if binary is None or driver is None:
        pytest.skip(
            "no headless browser here: install Debian's chromium and chromium-driver "
            "(apt-get install chromium chromium-driver; .ci/run does this)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_argument("--window-size=1280,1800")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.mark.slow
def test_ants_and_bees_report_in_a_real_browser(hymenoptera, sample_weights, tmp_path):
    """The page made from the ants/bees tables opens offline in headless Chromium with no console
    error, one map mark per image, every thumbnail decoded; a screenshot is saved."""
    from pipeline.extract import run as extract
    from pipeline.neighbors import run as neighbors
    from pipeline.train_head import run as train_head

    features = tmp_path / "features"
    extract(
        ["--input", str(hymenoptera), "--output", str(features)]
        + ["--backbone", "mobilenet_v2", "--weights", "sample"]
    )
    train_head(
        ["--features", str(features), "--model-dir", str(tmp_path / "head"), "--epochs", "40"]
    )
    neighbors(
        ["--features", str(features), "--output", str(tmp_path / "nn"), "--duplicates", "0.95"]
    )
    page = tmp_path / "report.html"
    summary = report.run(
        ["--features", str(features), "--output", str(page), "--neighbors", str(tmp_path / "nn")]
        + ["--head", str(tmp_path / "head")]
    )
    rows = summary["rows"]
    assert rows == summary["map_points"] >= 390
    thumbnails = page.read_text().count('<img src="data:image/jpeg;base64,')

    browser = _browser()
    try:
        browser.get(page.as_uri())
        marks = browser.execute_script(
            "return document.querySelectorAll('#map-chart .scatterlayer .point').length"
        )
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth])"
        )
        charts = browser.execute_script(
            "return document.querySelectorAll('.js-plotly-plot').length"
        )
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        browser.save_screenshot(str(tmp_path / "report.png"))
    finally:
        browser.quit()
    assert errors == []
    assert marks == rows
    assert len(images) == thumbnails > 12 * 7
    assert all(complete and width > 0 for complete, width in images)
    assert charts == 4  # labels and splits, map, confusion matrix, learning curves
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert np.isfinite(summary["seconds"])
