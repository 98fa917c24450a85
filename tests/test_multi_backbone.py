"""Several backbones in one decode pass: one table per backbone, each equal to a separate run,
each incremental on its own; images decoded once per (size, resize, interpolation)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import encode, gradient
from hub_checkpoints import write_transformers_dinov2

from pipeline.extract import run
from transforms import extract as extract_module
from transforms import table

TWO_CNNS = ["--backbone", "mobilenet_v2,mobilenet_v3_small", "--weights", "none"]
TWO_CNNS += ["--image-size", "32", "--chunk-size", "4"]


def _same_table(a, b):
    one, two = table.read_table(str(a)), table.read_table(str(b))
    order_one = np.argsort(one.column("image_id").to_numpy(zero_copy_only=False))
    order_two = np.argsort(two.column("image_id").to_numpy(zero_copy_only=False))
    for name in ("image_id", "uri", "label", "split", "width", "height"):
        assert np.array_equal(
            one.column(name).to_numpy(zero_copy_only=False)[order_one],
            two.column(name).to_numpy(zero_copy_only=False)[order_two],
        ), name
    np.testing.assert_allclose(
        table.features_matrix(one)[order_one],
        table.features_matrix(two)[order_two],
        rtol=1e-5,
        atol=1e-6,
    )
    meta_one, meta_two = table.table_metadata(one.schema), table.table_metadata(two.schema)
    assert {k: v for k, v in meta_one.items()} == {k: v for k, v in meta_two.items()}


@pytest.mark.slow
def test_tables_equal_separate_runs_row_for_row(image_tree, tmp_path):
    """A KerasHub tower (Transformers checkpoint, bicubic crop at 28 px) and a CNN (bilinear
    squash at 32 px): two decode groups, one table each, equal to separate runs."""
    hf = write_transformers_dinov2(tmp_path / "ckpt", registers=4)
    flags = {
        "dinov2_with_registers_small": ["--weights", str(hf), "--image-size", "28"],
        "mobilenet_v2": ["--weights", "none", "--image-size", "32"],
    }
    base = ["--input", str(image_tree), "--chunk-size", "5"]
    summary = run(
        [*base, "--output", str(tmp_path / "multi")]
        + ["--backbone", ",".join(flags), "--weights", f"{hf},none", "--image-size", "28,32"]
    )
    assert [s["rows"] for s in summary["tables"]] == [12, 12]
    for backbone, extra in flags.items():
        run([*base, "--output", str(tmp_path / backbone), "--backbone", backbone, *extra])
        _same_table(tmp_path / "multi" / backbone, tmp_path / backbone)


def test_each_image_is_read_and_decoded_once(image_tree, tmp_path, monkeypatch):
    calls = []
    original = extract_module.read_and_decode

    def counting(ref, targets, *args):
        calls.append((ref.uri, len(targets)))
        return original(ref, targets, *args)

    monkeypatch.setattr(extract_module, "read_and_decode", counting)
    summary = run(["--input", str(image_tree), "--output", str(tmp_path / "o"), *TWO_CNNS])
    assert [(s["rows"], s["errors"]) for s in summary["tables"]] == [(12, 0), (12, 0)]
    assert len(calls) == 12 and len({uri for uri, _ in calls}) == 12
    assert {n for _, n in calls} == {1}  # both backbones take the same 32 px squash
    for backbone in ("mobilenet_v2", "mobilenet_v3_small"):
        meta = table.table_metadata(table.read_table(str(tmp_path / "o" / backbone)).schema)
        assert meta["backbone"] == backbone


def test_each_table_is_incremental_on_its_own(image_tree, tmp_path):
    """A table removed between runs is rebuilt whole; the other only gains the new image; a
    bad file is an error row in both."""
    out = tmp_path / "o"
    run(["--input", str(image_tree), "--output", str(out), *TWO_CNNS])
    (image_tree / "train" / "cats" / "new.png").write_bytes(encode(gradient(seed=99)))
    (image_tree / "train" / "cats" / "broken.jpg").write_bytes(b"not a jpeg")
    import shutil

    shutil.rmtree(out / "mobilenet_v3_small")
    summary = run(
        ["--input", str(image_tree), "--output", str(out), *TWO_CNNS, "--mode", "incremental"]
    )
    first, second = summary["tables"]
    assert (first["run"]["embedded"], first["rows"], first["errors"]) == (2, 13, 1)
    assert (second["run"]["embedded"], second["rows"], second["errors"]) == (14, 13, 1)
    _same_table(out / "mobilenet_v2", out / "mobilenet_v2")  # readable, consistent
    plan = run(
        ["--input", str(image_tree), "--output", str(out), *TWO_CNNS]
        + ["--mode", "incremental", "--plan-only"]
    )
    assert [p["plan"].to_embed for p in plan["tables"]] == [0, 0]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--backbone", "resnet50,resnet50"], "lists a backbone twice"),
        (["--backbone", "resnet50,vgg16", "--weights", "none,none,none"], "3 values for 2"),
        (["--backbone", "resnet50,vgg16", "--layer", "fc2"], "not with several backbones"),
    ],
)
def test_bad_multi_backbone_flags(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(["--input", str(tmp_path), "--output", str(tmp_path / "o"), *argv])
    assert message in capsys.readouterr().err


def test_one_plan_line_one_summary_and_progress_counting_images(
    image_tree, tmp_path, monkeypatch, caplog, capsys
):
    """Issue 19, item 16: two backbones print one plan line and one summary (a row per
    backbone), and the progress counts each image once (a broken one once, as an error)."""
    from pipeline import extract as job
    from transforms.embed.progress import Progress

    (image_tree / "train" / "cats" / "broken.jpg").write_bytes(b"not a jpeg")
    counted = {"total": [], "done": 0, "errors": 0}

    def start(total, **_):
        counted["total"].append(total)

    def add(*, done=0, errors=0):
        counted["done"] += done
        counted["errors"] += errors

    monkeypatch.setattr(Progress, "start", classmethod(lambda cls, total, **kw: start(total)))
    monkeypatch.setattr(Progress, "add", classmethod(lambda cls, **kw: add(**kw)))
    caplog.set_level("INFO")
    out = tmp_path / "o"
    job.main(["--input", str(image_tree), "--output", str(out), *TWO_CNNS])

    assert counted == {"total": [13], "done": 12, "errors": 1}
    plan_lines = [r.getMessage() for r in caplog.records if "images listed" in r.getMessage()]
    assert len(plan_lines) == 1, plan_lines
    assert "13 images listed, 13 to embed in 4 chunk(s) for 2 backbones" in plan_lines[0]
    assert "mobilenet_v2: 13 to embed" in plan_lines[0]
    assert "mobilenet_v3_small: 13 to embed" in plan_lines[0]

    printed = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("inputs 13") for line in printed) == 1, printed
    assert sum("wall time" in line for line in printed) == 1
    assert any("2 backbones in one pass, embedded 13 images in 4 chunk(s)" in x for x in printed)
    header = next(i for i, line in enumerate(printed) if line.startswith("backbone "))
    rows = [line.split() for line in printed[header + 1 : header + 3]]
    assert [r[0] for r in rows] == ["mobilenet_v2", "mobilenet_v3_small"]
    for row, backbone in zip(rows, ("mobilenet_v2", "mobilenet_v3_small"), strict=True):
        assert row[-1] == f"{out / backbone}/features-*.parquet"
        assert row[-7:-5] == ["12", "1"]  # rows, errors
    meta = [table.read_summary(str(out / b))["run"]["pass_images"] for b in ("mobilenet_v2",)]
    assert meta == [13]

    # An incremental pass where one table needs what the other has: 1 image for one, all for
    # the other, 13 images in all (the union), counted once each.
    import shutil

    shutil.rmtree(out / "mobilenet_v3_small")
    (image_tree / "train" / "cats" / "new.png").write_bytes(encode(gradient(seed=99)))
    counted.update(total=[], done=0, errors=0)
    job.main(["--input", str(image_tree), "--output", str(out), *TWO_CNNS, "--mode", "incremental"])
    assert counted == {"total": [14], "done": 13, "errors": 1}
    printed = capsys.readouterr().out
    assert "embedded 14 images" in printed
    lines = printed.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("backbone "))
    rows = {r.split()[0]: r.split() for r in lines[header + 1 : header + 3]}
    # rows, errors, new rows, new errors, kept: each table gained what it lacked
    assert rows["mobilenet_v2"][-7:-2] == ["13", "1", "1", "0", "12"]
    assert rows["mobilenet_v3_small"][-7:-2] == ["13", "1", "13", "1", "0"]


def test_plan_only_prints_one_plan_with_a_row_per_backbone(image_tree, tmp_path, capsys):
    from pipeline import extract as job

    out = tmp_path / "o"
    job.main(["--input", str(image_tree), "--output", str(out), *TWO_CNNS, "--plan-only"])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "plan only, nothing was changed:"
    assert sum(line.startswith("listed 12 images") for line in printed) == 1, printed
    assert "to embed: 12 images in 3 chunk(s) for 2 backbones" in printed
    header = printed.index(next(x for x in printed if x.startswith("backbone ")))
    assert [line.split()[0] for line in printed[header + 1 : header + 3]] == [
        "mobilenet_v2",
        "mobilenet_v3_small",
    ]
    assert not out.exists()


def test_an_image_one_table_fails_is_counted_once_as_an_error(image_tree, tmp_path, monkeypatch):
    """One backbone's batches fail (error rows in its table), the other's succeed: each image
    advances the progress once, as an error; the summary row of each table says what it holds."""
    from transforms.embed.handler import BackboneModelHandler
    from transforms.embed.progress import Progress

    original = BackboneModelHandler.run_inference

    def run_inference(self, batch, model, inference_args=None):
        if self.recipe.backbone == "mobilenet_v3_small":
            raise RuntimeError("out of memory")
        return original(self, batch, model, inference_args)

    counted = {"done": 0, "errors": 0}

    def add(*, done=0, errors=0):
        counted["done"] += done
        counted["errors"] += errors

    monkeypatch.setattr(BackboneModelHandler, "run_inference", run_inference)
    monkeypatch.setattr(Progress, "add", classmethod(lambda cls, **kw: add(**kw)))
    summary = run(["--input", str(image_tree), "--output", str(tmp_path / "o"), *TWO_CNNS])
    first, second = summary["tables"]
    assert (first["rows"], first["errors"], second["rows"], second["errors"]) == (12, 0, 0, 12)
    assert counted == {"done": 0, "errors": 12}
    assert {s["run"]["pass_images"] for s in summary["tables"]} == {12}
