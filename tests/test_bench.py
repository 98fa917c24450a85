"""The benchmark stays runnable: a tiny run of every measurement (figures are not asserted)."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

from benchmarks import bench


@pytest.mark.slow
def test_bench_runs_every_measurement(image_tree, capsys):
    bench.main(
        ["--images", str(image_tree), "--count", "12", "--backbones", "mobilenet_v2"]
        + ["--weights", "none", "--skip", "memory,bf16,hub,neighbors,serve", "--chunk-size", "4"]
        + ["--plan-sizes", "2000", "--rounds", "1", "--large-count", "2"]
    )
    out = capsys.readouterr().out
    for name in (
        "model only",
        "decode+model limit",
        "ours, 1 process",
        "ours, 2 processes",
        "2 processes, all cores each",
        "load+decode+model",
        "RunInference",
        "Keras dataset",
    ):
        line = next(x for x in out.splitlines() if name in x)
        assert re.search(r"\d+\.\d+\s+\d+\.\d+", line), line
    assert "scaling 2 processes / 1 process" in out
    assert re.search(r"ours / Keras dataset \+ predict, per round: \d+\.\d\dx; worst", out)
    assert re.search(r"start-up: first batch \d+\.\d s after process start \(imports", out)
    assert re.search(r"images/s per core: ants/bees \d+ .* 12 MP photos \d+\.\d", out)
    assert "quality guard" in out
    assert re.search(r"ants/bees photos: cosine mean [01]\.\d{5}, 1st percentile", out)
    assert re.search(r"12 MP photos: cosine mean [01]\.\d{5}", out)
    assert re.search(r"head val accuracy \d\.\d{3} \(reference", out)
    assert re.search(r"several backbones in one pass .* one pass \d+\.\d s: \d+\.\d\dx", out)
    planner = next(x for x in out.splitlines() if x.strip().startswith("2,000"))
    assert re.search(r"22 \(20 \+ 2\), 1,978, 2, 20", planner)


@pytest.mark.slow
def test_bench_hub_section_runs(image_tree, capsys):
    bench.main(
        ["--images", str(image_tree), "--count", "4", "--batch-size", "2", "--only", "hub"]
        + ["--hub-backbones", "dinov2_small", "--torch-python", ""]
    )
    out = capsys.readouterr().out
    assert re.search(r"ours, model only \(compiled\)\s+\d+\.\d", out)
    assert re.search(r"ours, end to end, 1 process\s+\d+\.\d", out)
    assert "PyTorch: skipped" in out or re.search(r"PyTorch .* model only\s+\d", out)


def test_bench_input_is_distinct_links(image_tree, tmp_path):
    folder = bench.make_input(image_tree, 30, tmp_path / "links")
    links = sorted(folder.iterdir())
    assert len(links) == 30 and all(p.is_symlink() for p in links)
    assert len({p.resolve() for p in links}) == 12  # cycles over the 12 images


def test_bench_neighbors_section(capsys):
    """Exact and faiss timings, recall@10 where both ran, extrapolated exact time past it."""
    bench.main(["--only", "neighbors", "--nn-sizes", "1000,2000", "--nn-exact-max", "1000"])
    out = capsys.readouterr().out
    lines = {x.split()[0]: x for x in out.splitlines() if re.match(r"\s+[12],000 ", x)}
    assert re.search(r"1,000\s+\d+\.\d\s+\d+\.\d\s+\d+\.\d\dx\s+[01]\.\d{4}", lines["1,000"])
    assert re.search(r"2,000\s+~\s*\d+\s+\d+\.\d\s+~\s*\d+x\s+[01]\.\d{4}\*", lines["2,000"])
    assert "extrapolated from exact at 1,000 rows" in out


@pytest.mark.slow
def test_bench_serve_section(image_tree, capsys):
    """The service's rows: by id (exact and faiss) and uploads, with errors 0 and the ratio."""
    bench.main(
        ["--only", "serve", "--images", str(image_tree), "--weights", "none"]
        + ["--serve-sizes", "500", "--serve-requests", "40", "--serve-clients", "2"]
    )
    out = capsys.readouterr().out
    for kind in ("exact", "faiss"):
        assert re.search(rf"by id\s+500\s+{kind}\s+40\s+\d+\.\d\s+\d+\.\d\s+\d+\.\d\s+0\s", out)
    assert re.search(r"upload, 1 cl\.\s+12\s+exact\s+20\s", out)
    assert re.search(r"decode \+ model alone .* \d+\.\d ms median; .* \(\d+\.\d\dx\)", out)


def test_no_job_or_building_block_imports_the_benchmarks():
    """The floors point down: ``benchmarks`` imports the jobs, never the other way round."""
    root = pathlib.Path(__file__).resolve().parents[1]
    offenders = []
    for path in sorted([*root.glob("pipeline/**/*.py"), *root.glob("transforms/**/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            offenders += [
                f"{path.relative_to(root)}: {n}" for n in names if n.split(".")[0] == "benchmarks"
            ]
    assert offenders == []
