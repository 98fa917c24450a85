"""The one config object of the extraction job, parsed from flags and validated once.

Flags this module does not know are returned untouched: they are Beam's own pipeline options
(``--runner``, ``--direct_num_workers``, ``--temp_location``, ...), passed straight through.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline import sample_weights
from transforms import storage
from transforms.backbones import BACKBONES, POOLINGS, PRECISIONS, ModelSpec
from transforms.extract import DEFAULT_CHUNK_SIZE, MODES
from transforms.images import DEFAULT_MAX_PIXELS, RESIZE_MODES


def demo_images_dir() -> str:
    """scikit-image's bundled sample photos (a few are deliberately odd: RGBA, grey, TIFF)."""
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "--demo needs scikit-image for its sample photos: pip install scikit-image"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


@dataclass(frozen=True)
class ExtractConfig:
    """What the extraction job does; built by :func:`parse_args`.

    Attributes:
        inputs: folders, globs, manifests or files (local or ``gs://``).
        output: the table folder (local or ``gs://``).
        model: backbone, weights (already resolved to a path for ``sample``), pooling/layer, size.
        batch_size: images per model call.
        resize: ``squash`` or ``crop``.
        max_pixels: decompression-bomb guard.
        mode: ``full`` (new table) or ``incremental`` (add what is new or changed; resumes).
        chunk_size: images per work unit and per shard file.
        decode_threads: decoding threads per worker process.
        retry_errors: in incremental mode, retry images that failed before.
        precision: ``float32`` or ``bfloat16`` (Keras mixed precision) for the backbone.
        intra_op_threads: TensorFlow threads per worker process; 0 = its own default, or a
            share of the cores when several local worker processes run (see ``runners``).
        overwrite: replace an existing table in ``output``.
        cache_dir: where remote weights are copied on workers.
    """

    inputs: tuple[str, ...]
    output: str
    model: ModelSpec
    batch_size: int = 32
    resize: str = "squash"
    max_pixels: int = DEFAULT_MAX_PIXELS
    mode: str = "full"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    decode_threads: int = 2
    retry_errors: bool = False
    precision: str = "float32"
    intra_op_threads: int = 0
    overwrite: bool = False
    cache_dir: str | None = None

    def __post_init__(self):
        if not self.inputs:
            raise ValueError("at least one --input is required")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"--resize must be one of {RESIZE_MODES}")
        if self.max_pixels < 1:
            raise ValueError("--max-pixels must be >= 1")
        if self.chunk_size < 1:
            raise ValueError(f"--chunk-size must be >= 1, got {self.chunk_size}")
        if self.decode_threads < 1:
            raise ValueError(f"--decode-threads must be >= 1, got {self.decode_threads}")
        if self.intra_op_threads < 0:
            raise ValueError("--intra-op-threads must be >= 0")
        if self.mode == "incremental" and self.overwrite:
            raise ValueError("--overwrite starts a new table; it cannot be --mode incremental")


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that choose a backbone; shared by every job that runs one."""
    parser.add_argument(
        "--backbone",
        default="mobilenet_v2",
        help=f"registered backbone; one of: {', '.join(BACKBONES)} (default: %(default)s)",
    )
    parser.add_argument(
        "--weights",
        default="imagenet",
        help="imagenet (Keras download + cache), none (seeded random init), sample (offline real "
        "MobileNetV2 weights, see pipeline.sample_weights), or a local / gs:// path to a "
        ".weights.h5, .h5 or .keras file (default: %(default)s)",
    )
    parser.add_argument("--pooling", default="avg", choices=POOLINGS, help="default: %(default)s")
    parser.add_argument(
        "--layer", default=None, help="use a named layer of the full classifier (e.g. VGG16 fc2)"
    )
    parser.add_argument(
        "--image-size", type=int, default=None, help="square input side (default: the backbone's)"
    )


def model_spec_from_args(args: argparse.Namespace) -> ModelSpec:
    """Validates the model flags; resolves ``--weights sample`` to its cached file.

    Raises:
        ValueError: a bad combination, or a weights file that does not exist.
    """
    weights = args.weights
    image_size = args.image_size
    if weights.lower() in ("imagenet", "none"):
        weights = weights.lower()
    elif weights.lower() == "sample":
        if args.backbone.lower().replace("-", "_") != sample_weights.BACKBONE:
            raise ValueError(
                f"--weights sample is only available for --backbone {sample_weights.BACKBONE}"
            )
        weights = sample_weights.ensure_sample_weights()
        image_size = image_size or sample_weights.IMAGE_SIZE
    elif not storage.exists(weights):
        raise ValueError(f"--weights file not found: {weights}")
    return ModelSpec(
        backbone=args.backbone,
        weights=weights,
        pooling=args.pooling,
        layer=args.layer or None,
        image_size=image_size,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.extract",
        description="Embed an image collection with a pretrained headless CNN into a Parquet "
        "feature table. Unknown flags are Beam pipeline options (e.g. --runner, "
        "--direct_num_workers 2 --direct_running_mode multi_processing; --runner dask with "
        "--dask_client_address HOST:PORT, or --dask_local_workers N for a local cluster).",
    )
    parser.add_argument(
        "--input",
        action="append",
        default=[],
        help="folder, glob, gs:// prefix, or manifest (.csv/.tsv/.txt); repeatable",
    )
    parser.add_argument("--output", help="output folder for the table (local or gs://)")
    add_model_flags(parser)
    parser.add_argument("--batch-size", type=int, default=32, help="default: %(default)s")
    parser.add_argument(
        "--resize", default="squash", choices=RESIZE_MODES, help="default: %(default)s"
    )
    parser.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="default: %(default)s"
    )
    parser.add_argument(
        "--mode",
        default="full",
        choices=MODES,
        help="full: write a new table (default); incremental: embed only images not yet in "
        "--output or whose file changed, and finish a run that was killed",
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        help="images per work unit and per shard file; a killed run loses at most the "
        "chunks in flight (default: %(default)s)",
    )
    parser.add_argument(
        "--retry-errors",
        action="store_true",
        help="incremental mode: also retry images whose earlier attempt is in _errors/",
    )
    parser.add_argument(
        "--decode-threads",
        type=int,
        default=2,
        help="image decoding threads per worker process, overlapping the model (default: 2)",
    )
    parser.add_argument(
        "--precision",
        default="float32",
        choices=PRECISIONS,
        help="bfloat16 runs the backbone in Keras mixed precision: faster on CPUs with bf16 "
        "support and on GPUs for large convnets, slower for depthwise nets (MobileNet); "
        "default: %(default)s",
    )
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="TensorFlow threads per worker process (default: all cores for one process, "
        "an equal share when --direct_num_workers processes share the machine)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing table")
    parser.add_argument("--cache-dir", default=None, help="worker cache for remote weight files")
    parser.add_argument(
        "--demo",
        action="store_true",
        help="embed scikit-image's sample photos with the offline real MobileNetV2 "
        "(--backbone mobilenet_v2 --weights sample) into ./out/demo unless given other flags",
    )
    return parser


def underscore_aliases(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """Accepts ``--batch_size`` for our ``--batch-size`` (Beam's own flags use underscores, and
    Dataflow flex-template parameter names cannot hold dashes). Beam's flags are left alone."""
    ours = {o for action in parser._actions for o in action.option_strings}
    out = []
    for arg in argv:
        name, eq, value = arg.partition("=")
        dashed = "--" + name[2:].replace("_", "-")
        if arg.startswith("--") and name not in ours and dashed in ours:
            arg = dashed + eq + value
        out.append(arg)
    return out


def parse_args(argv: Sequence[str] | None) -> tuple[ExtractConfig, list[str]]:
    """Parses our flags; returns the config and the remaining (Beam) flags.

    Raises:
        SystemExit: on bad flags, with argparse's usage message.
    """
    parser = build_parser()
    args, beam_args = parser.parse_known_args(
        underscore_aliases(parser, sys.argv[1:] if argv is None else argv)
    )
    if args.demo:
        args.input = args.input or [demo_images_dir()]
        args.output = args.output or os.path.join("out", "demo")
        if args.weights == "imagenet":
            args.weights = "sample"
        args.overwrite = True
    if not args.input:
        parser.error("--input is required (or --demo)")
    if not args.output:
        parser.error("--output is required (or --demo)")
    try:
        config = ExtractConfig(
            inputs=tuple(args.input),
            output=args.output,
            model=model_spec_from_args(args),
            batch_size=args.batch_size,
            resize=args.resize,
            max_pixels=args.max_pixels,
            mode=args.mode,
            chunk_size=args.chunk_size,
            decode_threads=args.decode_threads,
            retry_errors=args.retry_errors,
            precision=args.precision,
            intra_op_threads=args.intra_op_threads,
            overwrite=args.overwrite,
            cache_dir=args.cache_dir,
        )
    except ValueError as exc:
        parser.error(str(exc))
    return config, beam_args


def model_spec_from_metadata(meta: dict[str, str]) -> ModelSpec:
    """Rebuilds the ModelSpec that produced a feature table (as recorded in its metadata).

    The offline sample weights are re-prepared if this machine has no cached copy. The weights'
    fingerprint must match the recorded one.

    Raises:
        ValueError: the recorded weights are missing or differ from those that made the table.
    """
    weights = meta["weights"]
    if weights not in ("imagenet", "none") and not storage.exists(weights):
        if os.path.basename(weights) != sample_weights.FILE_NAME:
            raise ValueError(f"the weights that made this table are not here: {weights}")
        weights = sample_weights.ensure_sample_weights()
    spec = ModelSpec(
        backbone=meta["backbone"],
        weights=weights,
        pooling=meta.get("pooling") or "avg",
        layer=meta.get("layer") or None,
        image_size=int(meta["input_size"]),
    )
    recorded = meta.get("weights_fingerprint")
    if recorded and spec.fingerprint() != recorded:
        raise ValueError(f"weights {weights} do not match the table's fingerprint {recorded}")
    return spec
