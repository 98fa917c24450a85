"""Throughput and memory benchmark: our pipeline against the model's limit, Beam RunInference and
plain Keras, on the same images and backbone, in one run.

    python -m benchmarks                          # ants/bees x4 (1,584 images), MobileNetV2 + ResNet50
    python -m benchmarks --images DIR --count 400 --backbones resnet50 --skip memory,bf16

Every figure is measured in its own fresh Python process (so each pays its own imports and model
load exactly as a user's job would, and its peak RSS is its own); this process only prints.

For each backbone:

1. ``limit``: our compiled function (uint8 in, preprocessing in the graph) on pre-decoded batches:
   the model-only images/s; decoding the same images with Pillow in one thread is timed
   separately, and ``decode+model`` = images / (decode time + model time) is what one process
   doing both, one after the other, could reach once its model is loaded; ``load+decode+model``
   adds the model load (imports, build, weights): a plain script with no framework overhead.
2. ``ours``: ``pipeline.extract`` end to end (listing, reading, decoding, embedding, Parquet,
   model load included) in one process, and with 2 worker processes, each with its share of
   TensorFlow threads (and, for comparison, each with all of them).
3. ``runinference``: the obvious Beam pipeline: ``MatchFiles`` -> ``ReadMatches`` -> Pillow decode +
   ``preprocess_input`` -> ``RunInference(TFModelHandlerNumpy)`` with its defaults ->
   ``WriteToParquet``, on the same in-process runner.
4. ``keras``: ``keras.utils.image_dataset_from_directory`` + ``model.predict``.

Then: peak RSS of our one-process job on N and 10xN images (flat means memory is bounded by the
model and a few batches, not the dataset), and ``--precision bfloat16`` against float32 (speed,
cosine of the vectors, and for the real sample weights the ants/bees head accuracy).

``multi``: two backbones in one decode pass (``--backbone a,b``) against two separate runs on the
same images. ``hub``: the KerasHub towers (``--hub-backbones``, random init of the presets'
architectures, so offline) model-only and end to end, beside the same architecture in
Hugging Face Transformers / PyTorch (random init, model only, same batch and threads) when a Python
with torch + transformers is given (``--torch-python`` or ``FEATUREBEAM_TORCH_PYTHON``; they are
not project dependencies); otherwise that row says it was skipped.

``plan`` and ``neighbors``: the planner and all-rows k-NN on synthetic tables of up to 10M and 1M
rows (``benchmarks.plan``, ``benchmarks.neighbors``). ``serve``: the search service's latency and
throughput under a bounded load generator on 127.0.0.1 (``benchmarks.serve``).

The input set is a temporary folder of ``--count`` symlinks cycling over the images (distinct
URIs, so every one is embedded).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks import neighbors, plan
from benchmarks import serve as service
from pipeline import cli
from transforms import startup
from transforms.extract import DEFAULT_CHUNK_SIZE
from transforms.models.recipe import DEFAULT_BATCH_SIZE, DEFAULT_PRECISION

SIZES = {
    "mobilenet_v2": 160,
    "resnet50": 224,
    "mobilenet_v3_large": 160,
    "dinov2_small": 224,
    "siglip_base_patch16_224": 224,
}
#: The transformers the hub section times (random init; model cost does not depend on weights).
HUB_BACKBONES = ("dinov2_small", "siglip_base_patch16_224")
_TORCH_SCRIPT = Path(__file__).resolve().parent / "torch_reference.py"
_SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "hymenoptera"


def _peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def _image_files(folder: Path) -> list[Path]:
    from transforms.listing import IMAGE_EXTENSIONS

    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def make_input(source: Path, count: int, target: Path) -> Path:
    """``count`` symlinks cycling over the images under ``source`` in one flat folder."""
    files = _image_files(source)
    if not files:
        raise FileNotFoundError(f"no images under {source}")
    target.mkdir(parents=True)
    for i in range(count):
        src = files[i % len(files)]
        (target / f"img_{i:06d}{src.suffix.lower()}").symlink_to(src.resolve())
    return target


def make_large_photos(source: Path, count: int, target: Path) -> Path:
    """``count`` 12-megapixel JPEGs (4000 x 3000, quality 90) made by upscaling the photos under
    ``source``; every third one is stored turned and carries the EXIF orientation (6, or 8)
    that turns it back, as phone cameras write them."""
    from PIL import Image

    files = _image_files(source)[:count]
    target.mkdir(parents=True)
    for i, src in enumerate(files):
        with Image.open(src) as image:
            rgb = image.convert("RGB")
        size = (4000, 3000) if rgb.width >= rgb.height else (3000, 4000)
        big = rgb.resize(size, Image.Resampling.BICUBIC)
        exif = Image.Exif()
        if i % 3 == 1:  # displayed = stored turned 90 degrees clockwise
            big, exif[0x0112] = big.transpose(Image.Transpose.ROTATE_90), 6
        elif i % 3 == 2 and i % 2 == 0:
            big, exif[0x0112] = big.transpose(Image.Transpose.ROTATE_270), 8
        big.save(target / f"large_{i:04d}.jpg", quality=90, exif=exif.tobytes())
    return target


#: Published ResNet-50 v1.5 inference throughput (TensorFlow, images/s, best batch size) that the
#: GPU sizing divides by our measured decode rate per core. NVIDIA DeepLearningExamples,
#: TensorFlow/Classification/ConvNets/resnet50v1.5/README.md, "Inference performance: NVIDIA T4"
#: (TF 20.06 NGC container); the L4 figure is the T4 AMP + XLA one times the "up to 4.4x" L4/T4
#: ratio of DEEP-GAP (arXiv:2604.14552, ResNet-50 with TensorRT), so an upper bound.
GPU_THROUGHPUT = {
    "T4 fp32": 430,
    "T4 mixed precision + XLA": 1194,
    "L4 (up to 4.4x T4)": round(1194 * 4.4),
}


# --- measurements, each run in its own process (python -m benchmarks --measure KIND ...) ---


def _recipe(backbone: str, weights: str, precision: str | None = None):
    from transforms.models.recipe import FeatureRecipe

    return FeatureRecipe.from_flags(
        backbone=backbone, weights=weights, image_size=SIZES[backbone], precision=precision
    )


def measure_limit(args) -> dict:
    import numpy as np

    from transforms.embed.embedder import Embedder
    from transforms.images import load_image

    spec = _recipe(args.backbone, args.weights, args.precision)
    files = sorted(Path(args.input).iterdir())
    started = time.perf_counter()
    embedder = Embedder(spec, spec.weights_file)
    load_s = time.perf_counter() - started

    started = time.perf_counter()
    pixels = [
        load_image(
            f.read_bytes(), spec.size, resize=spec.resize, interpolation=spec.interpolation
        ).pixels
        for f in files
    ]
    decode_s = time.perf_counter() - started
    batches = [
        np.stack(pixels[i : i + args.batch_size]) for i in range(0, len(pixels), args.batch_size)
    ]
    embedder(batches[0])  # trace and warm up
    started = time.perf_counter()
    for batch in batches:
        embedder(batch)
    model_s = time.perf_counter() - started
    n = len(files)
    return {
        "images": n,
        "model_load_s": load_s,
        "decode_per_s": n / decode_s,
        "model_per_s": n / model_s,
        "decode_model_per_s": n / (decode_s + model_s),
        "load_decode_model_per_s": n / (load_s + decode_s + model_s),
    }


def measure_ours(args) -> dict:
    from pipeline.extract import run

    out = Path(args.work) / f"ours-{os.getpid()}"
    backbones = args.backbone.split(",")
    argv = ["--input", args.input, "--output", str(out), "--backbone", args.backbone]
    argv += ["--weights", args.weights]
    argv += ["--image-size", ",".join(str(SIZES[b]) for b in backbones)]
    argv += ["--batch-size", str(args.batch_size), "--chunk-size", str(args.chunk_size)]
    argv += ["--precision", args.precision]
    if args.intra_op_threads:
        argv += ["--intra-op-threads", str(args.intra_op_threads)]
    if args.processes > 1:
        argv += ["--direct_num_workers", str(args.processes)]
        argv += ["--direct_running_mode", "multi_processing"]
    started = time.perf_counter()
    summary = run(argv)
    seconds = time.perf_counter() - started
    first = summary["tables"][0] if "tables" in summary else summary
    return {
        "images": first["rows"] + first["errors"],
        "seconds": seconds,
        "table": str(out),
        "startup": first.get("startup", {}),
    }


def measure_runinference(args) -> dict:
    import apache_beam as beam
    import numpy as np
    import pyarrow as pa
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.ml.inference.tensorflow_inference import TFModelHandlerNumpy
    from PIL import Image

    from pipeline.runners import LocalRunner
    from transforms.models.build import build_model
    from transforms.models.preprocessing import preprocess_fn

    spec = _recipe(args.backbone, args.weights)
    model_path = str(Path(args.work) / f"{args.backbone}.keras")
    if not os.path.exists(model_path):
        build_model(spec, weights_path=spec.weights_file).save(model_path)
    size = spec.image_size
    preprocess_input = preprocess_fn(spec.spec)

    def decode(readable):
        with Image.open(readable.open()) as image:
            rgb = image.convert("RGB").resize((size, size), Image.BILINEAR)
        return readable.metadata.path, preprocess_input(np.asarray(rgb, dtype=np.float32))

    schema = pa.schema([("uri", pa.string()), ("feature", pa.list_(pa.float32()))])
    out = Path(args.work) / f"runinference-{os.getpid()}"
    started = time.perf_counter()
    with beam.Pipeline(runner=LocalRunner()) as p:
        keyed = (
            p
            | beam.io.fileio.MatchFiles(os.path.join(args.input, "*"))
            | beam.io.fileio.ReadMatches()
            | beam.Map(decode)
        )
        (
            keyed
            | RunInference(
                beam.ml.inference.base.KeyedModelHandler(TFModelHandlerNumpy(model_path))
            )
            | beam.Map(lambda kv: {"uri": kv[0], "feature": kv[1].inference.numpy().tolist()})
            | beam.io.WriteToParquet(str(out / "part"), schema)
        )
    seconds = time.perf_counter() - started
    return {"images": len(os.listdir(args.input)), "seconds": seconds}


def measure_keras(args) -> dict:
    import keras

    from transforms.models.build import build_model
    from transforms.models.preprocessing import preprocess_fn

    spec = _recipe(args.backbone, args.weights)
    started = time.perf_counter()
    model = build_model(spec, weights_path=spec.weights_file)
    preprocess_input = preprocess_fn(spec.spec)
    dataset = keras.utils.image_dataset_from_directory(
        args.input,
        labels=None,
        image_size=(spec.image_size, spec.image_size),
        batch_size=args.batch_size,
        shuffle=False,
    ).map(preprocess_input)
    vectors = model.predict(dataset, verbose=0)
    return {"images": len(vectors), "seconds": time.perf_counter() - started}


def _decode_rate(files: list[Path], size: int, margin: float) -> float:
    """Images/s of one thread reading and decoding ``files`` to ``size`` (squash, bilinear)."""
    from transforms.images import load_image

    datas = [f.read_bytes() for f in files]
    started = time.perf_counter()
    for data in datas:
        load_image(data, (size, size), draft_margin=margin)
    return len(datas) / (time.perf_counter() - started)


def measure_decode(args) -> dict:
    """Decode images/s per core (one thread) on the input set and the large-photo set, with our
    JPEG draft (``images.DRAFT_MARGIN``), a draft down to the target size (faster, but it failed
    the quality guard) and a full decode."""
    from transforms.images import DRAFT_MARGIN

    size = SIZES[args.backbone]
    result = {}
    for name, folder in (("small", args.input), ("large", args.large)):
        files = sorted(Path(folder).iterdir())
        for label, margin in (("ours", DRAFT_MARGIN), ("target", 1), ("full", 0)):
            result[f"{name}_{label}"] = _decode_rate(files, size, margin)
    return result


def measure_quality(args) -> dict:
    """The quality guard over every speed-up at once: the vectors our job makes (its JPEG draft,
    the frozen graph) against the reference way (every pixel decoded, the Keras model as built),
    with the real sample weights, on the ants/bees photos and the 12 MP set: cosine mean, 1st
    percentile and minimum, and the ants/bees val accuracy of a logistic-regression head on each.
    """
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from transforms.embed.embedder import Embedder, frozen_graph_name
    from transforms.images import DRAFT_MARGIN, load_image

    spec = _recipe(args.backbone, args.weights)
    graph = Path(args.work) / "quality" / frozen_graph_name(spec.to_metadata())
    ours = Embedder(spec, spec.weights_file, frozen_graph=str(graph))
    reference = Embedder(spec, spec.weights_file)

    def vectors(files, embedder, margin):
        pixels = [
            load_image(f.read_bytes(), spec.size, resize=spec.resize, draft_margin=margin).pixels
            for f in files
        ]
        return np.concatenate(
            [embedder(np.stack(pixels[i : i + 32])) for i in range(0, len(pixels), 32)]
        )

    def cosines(a, b):
        return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)

    source = Path(args.input)
    result, split_vectors = {}, {}
    for split in ("train", "val"):
        files = sorted(p for p in (source / split).rglob("*") if p.is_file())
        labels = [f.parent.name for f in files]
        split_vectors[split] = (
            vectors(files, ours, DRAFT_MARGIN),
            vectors(files, reference, 0),
            labels,
        )
    cos = np.concatenate([cosines(a, b) for a, b, _ in split_vectors.values()])
    large = sorted(Path(args.large).iterdir()) if args.large else []
    sets = {"small": cos}
    if large:
        sets["large"] = cosines(vectors(large, ours, DRAFT_MARGIN), vectors(large, reference, 0))
    for name, values in sets.items():
        result[f"{name}_images"] = len(values)
        result[f"{name}_cosine_mean"] = float(values.mean())
        result[f"{name}_cosine_p1"] = float(np.percentile(values, 1))
        result[f"{name}_cosine_min"] = float(values.min())
    (train, train_ref, train_y), (val, val_ref, val_y) = (
        split_vectors["train"],
        split_vectors["val"],
    )
    for label, (x, vx) in (("ours", (train, val)), ("reference", (train_ref, val_ref))):
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x, train_y)
        result[f"accuracy_{label}"] = float(clf.score(vx, val_y))
    return result


MEASURES = {
    "limit": measure_limit,
    "ours": measure_ours,
    "runinference": measure_runinference,
    "keras": measure_keras,
    "decode": measure_decode,
    "quality": measure_quality,
    "plan-data": plan.measure_plan_data,
    "plan": plan.measure_plan,
    "nn-data": neighbors.measure_nn_data,
    "nn": neighbors.measure_nn,
    "nn-recall": neighbors.measure_nn_recall,
    "nn-recall-sampled": neighbors.measure_nn_recall_sampled,
    **service.MEASURES,
}


def _measure_main(args) -> None:
    import logging

    if args.measure == "ours":  # as the job's own main sets itself up (quiet, quick exit)
        cli.configure_logging(["-q"])
    logging.basicConfig(level=logging.WARNING)
    result = MEASURES[args.measure](args)
    result["rss_mb"] = _peak_rss_mb()
    Path(args.result).write_text(json.dumps(result))


# --- the driver ---


def _measure(kind: str, work: Path, **options) -> dict:
    result = work / f"result-{kind}-{time.monotonic_ns()}.json"
    argv = [sys.executable, "-m", "benchmarks", "--measure", kind, "--result", str(result)]
    argv += ["--work", str(work)]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    started = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    process_s = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} {options} failed:\n{proc.stderr[-4000:]}")
    data = json.loads(result.read_text())
    # End-to-end rates are whole processes, from spawn to exit: every contender pays its own
    # imports, model build and teardown, as a user's script or job would.
    data["process_s"] = process_s
    if "seconds" in data:
        data["per_s"] = data["images"] / process_s
    return data


def _cosines(table_a: str, table_b: str):
    import numpy as np

    from transforms import table

    a = table.read_table(table_a).sort_by("image_id")
    b = table.read_table(table_b).sort_by("image_id")
    x, y = table.features_matrix(a), table.features_matrix(b)
    cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1) + 1e-12)
    return float(cos.min()), float(cos.mean())


def _head_accuracy(source: Path, work: Path, precision: str) -> float:
    """Ants/bees val accuracy of a logistic-regression head on sample-weight features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from pipeline.extract import run
    from transforms import table

    def features(split):
        out = work / f"head-{precision}-{split}"
        run(
            ["--input", str(source / split), "--output", str(out), "--backbone", "mobilenet_v2"]
            + ["--weights", "sample", "--precision", precision]
        )
        t = table.read_table(str(out))
        return table.features_matrix(t), t.column("label").to_pylist()

    (x, y), (vx, vy) = features("train"), features("val")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x, y)
    return float(clf.score(vx, vy))


def _torch_python(args) -> str | None:
    """A Python with torch + transformers: ``--torch-python``, $FEATUREBEAM_TORCH_PYTHON, or
    this one if it has them."""
    import importlib.util

    given = args.torch_python or os.environ.get("FEATUREBEAM_TORCH_PYTHON")
    if given:
        return given
    found = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))
    return sys.executable if found else None


def _measure_torch(python: str, backbone: str, batch_size: int, batches: int) -> dict:
    proc = subprocess.run(
        [python, str(_TORCH_SCRIPT), backbone, str(batch_size), str(batches)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"PyTorch measurement failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report_hub(args, inputs: str, work: Path) -> None:
    """Model-only and end-to-end speed of the KerasHub towers, and PyTorch's model-only."""
    python = _torch_python(args)
    print("\nmodern backbones (KerasHub, random init of the preset architecture, float32, XLA)")
    print(f"  {'':<34} {'images/s':>8} {'x PyTorch':>9}")
    for backbone in args.hub_backbones:
        common = dict(backbone=backbone, weights="none", batch_size=args.batch_size)
        limit = _measure("limit", work, input=inputs, **common)
        ours = _measure("ours", work, input=inputs, chunk_size=args.count, **common)
        torch_row = None
        if python:
            batches = max(2, min(8, args.count // args.batch_size))
            torch_row = _measure_torch(python, backbone, args.batch_size, batches)
        model = limit["model_per_s"]
        ratio = f"{model / torch_row['per_s']:8.2f}x" if torch_row else "        -"
        print(f"  {backbone} @ {SIZES[backbone]} px, model load {limit['model_load_s']:.1f} s")
        print(f"  {'  ours, model only (compiled)':<34} {model:8.1f} {ratio}")
        print(f"  {'  ours, end to end, 1 process':<34} {ours['per_s']:8.1f}")
        if torch_row:
            print(
                f"  {'  PyTorch ' + torch_row['version'] + ', model only':<34} "
                f"{torch_row['per_s']:8.1f}    1.00x  ({torch_row['threads']} threads)"
            )
        else:
            print(
                "    PyTorch: skipped (no torch + transformers here; pass --torch-python or set "
                "FEATUREBEAM_TORCH_PYTHON to a Python that has them)"
            )


def report_multi(args, inputs: str, work: Path) -> None:
    """Two backbones in one decode pass against two separate runs, same images."""
    pair = args.multi_backbones
    weights = [args.weights or ("sample" if b == "mobilenet_v2" else "none") for b in pair]
    common = dict(batch_size=args.batch_size, chunk_size=args.count)
    separate = [
        _measure("ours", work, input=inputs, backbone=b, weights=w, **common)
        for b, w in zip(pair, weights, strict=True)
    ]
    together = _measure(
        "ours", work, input=inputs, backbone=",".join(pair), weights=",".join(weights), **common
    )
    apart_s = sum(r["seconds"] for r in separate)
    each = " + ".join(f"{r['seconds']:.1f}" for r in separate)
    print(
        f"\nseveral backbones in one pass ({' + '.join(f'{b} @ {SIZES[b]}' for b in pair)}, "
        f"{args.count} images): separate runs {apart_s:.1f} s "
        f"({each}), one pass "
        f"{together['seconds']:.1f} s: {apart_s / together['seconds']:.2f}x"
    )


def _row(name: str, per_s: float, limit: float, baseline: float | None, rss: float) -> str:
    base = f"{per_s / baseline:5.2f}x" if baseline else "    - "
    return f"  {name:<34} {per_s:8.1f} {per_s / limit:8.2f} {base:>9} {rss:9.0f}"


def run_bench(args) -> None:
    if args.only in ("plan", "neighbors"):
        work = Path(tempfile.mkdtemp(prefix="featurebeam-bench-"))
        print(f"machine: {os.cpu_count()} cores")
        if args.only == "plan":
            plan.report(args.plan_sizes, _measure, work)
        else:
            neighbors.report(args.nn_sizes, args.nn_exact_max, _measure, work)
        print(f"\nwork folder (safe to delete): {work}")
        return
    source = Path(args.images)
    if args.only == "serve":
        work = Path(tempfile.mkdtemp(prefix="featurebeam-bench-"))
        print(f"machine: {os.cpu_count()} cores; images: {source}")
        _report_serve(args, source, work)
        print(f"\nwork folder (safe to delete): {work}")
        return

    def chunks_for(processes: int) -> int:
        # The job's default, or smaller so that every worker process gets a chunk.
        return args.chunk_size or min(DEFAULT_CHUNK_SIZE, -(-args.count // processes))

    work = Path(tempfile.mkdtemp(prefix="featurebeam-bench-"))
    print(f"machine: {os.cpu_count()} cores; images: {args.count} from {source}")
    inputs = str(make_input(source, args.count, work / "images"))
    if args.only in ("hub", "multi"):
        (report_hub if args.only == "hub" else report_multi)(args, inputs, work)
        print(f"\nwork folder (safe to delete): {work}")
        return
    large = None
    if "decode" not in args.skip:
        large = str(make_large_photos(source, args.large_count, work / "large"))
    for backbone in args.backbones:
        weights = args.weights or ("sample" if backbone == "mobilenet_v2" else "none")
        common = dict(backbone=backbone, weights=weights, batch_size=args.batch_size)
        print(f"\n{backbone} @ {SIZES[backbone]} px, weights {weights}, batch {args.batch_size}")
        limit = _measure("limit", work, input=inputs, **common)
        # Whole processes, alternating, ``--rounds`` times: the ratios quoted are the worst round.
        rounds = []
        for _ in range(args.rounds):
            rounds.append(
                {
                    "ours": _measure(
                        "ours", work, input=inputs, chunk_size=chunks_for(1), **common
                    ),
                    "keras": _measure("keras", work, input=inputs, **common),
                    "runinference": _measure("runinference", work, input=inputs, **common),
                }
            )
        ours1, keras_, ri = (
            min(r[k]["per_s"] for r in rounds) for k in ("ours", "keras", "runinference")
        )
        ours1_rss = max(r["ours"]["rss_mb"] for r in rounds)
        ours2 = _measure(
            "ours", work, input=inputs, chunk_size=chunks_for(2), processes=2, **common
        )
        # Without the thread share, each process's TensorFlow takes every core.
        ours2_all = _measure(
            "ours",
            work,
            input=inputs,
            chunk_size=chunks_for(2),
            processes=2,
            intra_op_threads=os.cpu_count() or 1,
            **common,
        )
        ref = limit["decode_model_per_s"]
        print(
            f"  model load {limit['model_load_s']:.1f} s; Pillow decode (1 thread) "
            f"{limit['decode_per_s']:.0f} images/s; end-to-end rates are whole processes "
            f"(imports and model load included), slowest of {args.rounds} rounds"
        )
        print(f"  {'':<34} {'images/s':>8} {'x limit':>8} {'x RunInf':>9} {'RSS MiB':>9}")
        print(_row("1. model only (compiled)", limit["model_per_s"], ref, ri, limit["rss_mb"]))
        print(_row("1. decode+model limit", ref, ref, ri, limit["rss_mb"]))
        print(
            _row(
                "1. load+decode+model, one script",
                limit["load_decode_model_per_s"],
                ref,
                ri,
                limit["rss_mb"],
            )
        )
        print(_row("2. ours, 1 process", ours1, ref, ri, ours1_rss))
        print(_row("2. ours, 2 processes", ours2["per_s"], ref, ri, ours2["rss_mb"]))
        print(
            _row("   2 processes, all cores each", ours2_all["per_s"], ref, ri, ours2_all["rss_mb"])
        )
        print(
            _row(
                "3. RunInference + TFModelHandlerNumpy",
                ri,
                ref,
                ri,
                max(r["runinference"]["rss_mb"] for r in rounds),
            )
        )
        print(
            _row(
                "4. Keras dataset + predict",
                keras_,
                ref,
                ri,
                max(r["keras"]["rss_mb"] for r in rounds),
            )
        )
        for name, key in (("Keras dataset + predict", "keras"), ("RunInference", "runinference")):
            each = [r["ours"]["per_s"] / r[key]["per_s"] for r in rounds]
            print(
                f"  ours / {name}, per round: "
                + ", ".join(f"{x:.2f}x" for x in each)
                + f"; worst {min(each):.2f}x"
            )
        print(f"  scaling 2 processes / 1 process: {ours2['per_s'] / ours1:.2f}x")
        marks = rounds[0]["ours"].get("startup") or {}
        if "first batch" in marks:
            print(
                f"  start-up: first batch {marks['first batch']:.1f} s after process start "
                f"({startup.steps(marks)})"
            )
        if large is not None:
            decode = _measure("decode", work, input=inputs, large=large, backbone=backbone)
            print(
                f"  decode to {SIZES[backbone]} px, images/s per core: ants/bees "
                f"{decode['small_ours']:.0f} (draft to the target size: {decode['small_target']:.0f}, "
                f"full decode {decode['small_full']:.0f}); 12 MP photos {decode['large_ours']:.1f} "
                f"({decode['large_target']:.1f}, {decode['large_full']:.1f})"
            )
            if backbone == "resnet50":
                print(
                    "  cores that keep a GPU busy decoding (published ResNet-50 images/s / ours per core):"
                )
                for gpu, per_s in GPU_THROUGHPUT.items():
                    print(
                        f"    {gpu:<26} {per_s:>5} images/s: {per_s / decode['small_ours']:5.1f} "
                        f"cores for ants/bees-sized photos, {per_s / decode['large_ours']:6.1f} for 12 MP"
                    )

        if "bf16" not in args.skip:
            bf_limit = _measure("limit", work, input=inputs, precision="bfloat16", **common)
            bf_ours = _measure(
                "ours",
                work,
                input=inputs,
                chunk_size=chunks_for(1),
                precision="bfloat16",
                **common,
            )
            low, mean = _cosines(rounds[0]["ours"]["table"], bf_ours["table"])
            print(
                f"  bfloat16: model only {bf_limit['model_per_s']:.1f} images/s "
                f"({bf_limit['model_per_s'] / limit['model_per_s']:.2f}x float32), end to end "
                f"{bf_ours['per_s']:.1f} ({bf_ours['per_s'] / ours1:.2f}x); "
                f"cosine to float32 min {low:.5f} mean {mean:.5f}"
            )

    if "memory" not in args.skip:
        backbone = args.backbones[0]
        weights = args.weights or ("sample" if backbone == "mobilenet_v2" else "none")
        small = str(make_input(source, args.memory_count, work / "mem-small"))
        large = str(make_input(source, 10 * args.memory_count, work / "mem-large"))
        rss = [
            _measure(
                "ours",
                work,
                input=folder,
                backbone=backbone,
                weights=weights,
                batch_size=args.batch_size,
                chunk_size=DEFAULT_CHUNK_SIZE,  # the default: the whole large set in one chunk
            )["rss_mb"]
            for folder in (small, large)
        ]
        print(
            f"\nmemory ({backbone}, one process): peak RSS {rss[0]:.0f} MiB for "
            f"{args.memory_count} images, {rss[1]:.0f} MiB for {10 * args.memory_count} "
            f"({rss[1] / rss[0]:.2f}x)"
        )

    if "multi" not in args.skip:
        report_multi(args, inputs, work)
    if "hub" not in args.skip:
        report_hub(args, inputs, work)
    if "plan" not in args.skip:
        plan.report(args.plan_sizes, _measure, work)
    if "neighbors" not in args.skip:
        neighbors.report(args.nn_sizes, args.nn_exact_max, _measure, work)
    if "serve" not in args.skip:
        _report_serve(args, source, work)

    if "quality" not in args.skip and (source / "train").is_dir() and (source / "val").is_dir():
        extra = {"large": large} if large else {}
        q = _measure(
            "quality", work, input=str(source), backbone="mobilenet_v2", weights="sample", **extra
        )
        print(
            "\nquality guard (mobilenet_v2 @ 160, real sample weights): our vectors (JPEG draft, "
            "frozen graph) against the reference (full decode, the Keras model as built)"
        )
        for name, what in (("small", "ants/bees photos"), ("large", "12 MP photos")):
            if f"{name}_images" in q:
                print(
                    f"  {q[f'{name}_images']} {what}: cosine mean {q[f'{name}_cosine_mean']:.5f}, "
                    f"1st percentile {q[f'{name}_cosine_p1']:.5f}, min {q[f'{name}_cosine_min']:.5f}"
                )
        print(
            f"  ants/bees head val accuracy {q['accuracy_ours']:.3f} "
            f"(reference {q['accuracy_reference']:.3f})"
        )

    if "bf16" not in args.skip and (source / "train").is_dir() and (source / "val").is_dir():
        acc = {p: _head_accuracy(source, work, p) for p in ("float32", "bfloat16")}
        print(
            f"\nants/bees head accuracy with the real sample weights: float32 "
            f"{acc['float32']:.3f}, bfloat16 {acc['bfloat16']:.3f}"
        )
    print(f"\nwork folder (safe to delete): {work}")


def _report_serve(args, source: Path, work: Path) -> None:
    """The search service's section over the images of ``source`` (the uploaded photo is the
    first of them in name order)."""
    service.report(args, str(source), str(_image_files(source)[0]), _measure, work)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(
        "benchmarks", description=cli.plain(__doc__) + " Each section is described in the module."
    )
    parser.add_argument(
        "--images",
        default=str(_SHARED) if _SHARED.is_dir() else None,
        help="folder of images (default: ../shared/data/hymenoptera)",
    )
    parser.add_argument("--count", type=int, default=1584, help="images per measurement")
    parser.add_argument(
        "--backbones",
        default="mobilenet_v2,resnet50",
        type=lambda s: [b.strip() for b in s.split(",") if b.strip()],
        help="comma-separated backbones measured",
    )
    parser.add_argument(
        "--weights",
        default=None,
        help="default: sample for mobilenet_v2 (real weights), none otherwise",
    )
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images per model call"
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=0,
        help="images per chunk; default: the job's (1000), or --count / processes if smaller, "
        "so that each worker process gets a chunk",
    )
    parser.add_argument(
        "--memory-count", type=int, default=100, help="images per peak-memory measurement"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="whole-process rounds of ours / Keras / RunInference; the worst is quoted",
    )
    parser.add_argument(
        "--large-count", type=int, default=48, help="12-megapixel photos made for the decode rows"
    )
    parser.add_argument(
        "--skip",
        default="",
        type=lambda s: set(s.split(",")),
        help="comma list of: bf16, memory, multi, hub, plan, neighbors, serve, decode, quality "
        "(default: none skipped)",
    )
    parser.add_argument(
        "--only",
        choices=("plan", "neighbors", "multi", "hub", "serve"),
        default=None,
        help="run only this section (plan: the planner; neighbors: all-rows k-NN, exact and "
        "faiss; multi: several backbones in one pass; hub: the KerasHub towers against PyTorch; "
        "serve: the search service's latency under load) "
        "(default: every section)",
    )
    parser.add_argument(
        "--multi-backbones",
        default="mobilenet_v2,mobilenet_v3_large",
        type=lambda s: [b.strip() for b in s.split(",") if b.strip()],
        help="the pair timed in one pass against separate runs (default: %(default)s)",
    )
    parser.add_argument(
        "--hub-backbones",
        default=",".join(HUB_BACKBONES),
        type=lambda s: [b.strip() for b in s.split(",") if b.strip()],
        help="KerasHub towers of the hub section (default: %(default)s)",
    )
    parser.add_argument(
        "--torch-python",
        default=None,
        help="a Python with torch + transformers for the PyTorch row (default: "
        "$FEATUREBEAM_TORCH_PYTHON, else this Python if it has them)",
    )
    parser.add_argument(
        "--plan-sizes",
        default="1000000,10000000",
        type=lambda s: [int(x) for x in s.split(",") if x],
        help="table/listing sizes of the planner section (default: %(default)s)",
    )
    parser.add_argument(
        "--nn-sizes",
        default="20000,50000,100000,1000000",
        type=lambda s: [int(x) for x in s.split(",") if x],
        help="table sizes of the neighbours section (default: %(default)s)",
    )
    parser.add_argument(
        "--nn-exact-max",
        type=int,
        default=100_000,
        help="time exact search up to this many rows; extrapolate past it (default: %(default)s)",
    )
    parser.add_argument(
        "--serve-sizes",
        default="10000,100000",
        type=lambda s: [int(x) for x in s.split(",") if x],
        help="table sizes of the search service section (default: %(default)s)",
    )
    parser.add_argument(
        "--serve-requests",
        type=int,
        default=2000,
        help="by-id searches per table and index kind; uploads: a twentieth (default: %(default)s)",
    )
    parser.add_argument(
        "--serve-clients",
        type=int,
        default=4,
        help="concurrent client connections of the load generator (default: %(default)s)",
    )
    # internal: one measurement in this process
    parser.add_argument("--measure", choices=sorted(MEASURES), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--backbone", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default=DEFAULT_PRECISION, help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--intra-op-threads", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--table", help=argparse.SUPPRESS)
    parser.add_argument("--large", help=argparse.SUPPRESS)
    parser.add_argument("--index", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.measure:
        # One measurement, set up as the job it measures would be (not through the jobs' main
        # wrapper); if it fails, the driver shows its traceback.
        _measure_main(args)
        return
    cli.run_main(lambda _: _check_and_run(parser, args), argv)


def _check_and_run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.images and args.only not in ("plan", "neighbors"):
        parser.error("--images is required (../shared/data/hymenoptera is not here)")
    unknown = [
        b for b in [*args.backbones, *args.multi_backbones, *args.hub_backbones] if b not in SIZES
    ]
    if unknown:
        parser.error(f"benchmarked backbones: {sorted(SIZES)}; got {unknown}")
    run_bench(args)


if __name__ == "__main__":
    main()
