"""The one config object of the extraction job, parsed from flags and validated once.

Flags this module does not know are returned untouched: they are Beam's own pipeline options
(``--runner``, ``--direct_num_workers``, ``--temp_location``, ...), passed straight through.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline import cli, recipe_flags
from pipeline.launch import TableRun
from transforms import storage
from transforms.embed.decode import DEFAULT_READ_TIMEOUT_S
from transforms.extract import (
    AUTO_DECODE_THREADS,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_DECODE_THREADS,
    MODES,
)
from transforms.images import DEFAULT_MAX_PIXELS
from transforms.lease import DEFAULT_EXPIRY_S
from transforms.models.recipe import DEFAULT_BATCH_SIZE, FeatureRecipe


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
        run: the inputs, the output table and how to treat it (mode, chunks, prune, lease, ...).
        recipes: what makes the vectors (backbone, weights, pooling/layer, size, resize,
            precision); several for a multi-backbone run, which writes one table per backbone
            under ``run.output`` (see :attr:`tables`).
        batch_size: images per model call.
        max_pixels: decompression-bomb guard.
        read_timeout_s: seconds one image's read may take before it becomes an error row.
        decode_threads: decoding threads per worker process (0: auto).
        intra_op_threads: TensorFlow threads per worker process; 0 = its own default, or a
            share of the cores when several local worker processes run (see ``runners``).
        cache_dir: where remote weights are copied on workers.
    """

    run: TableRun
    recipes: tuple[FeatureRecipe, ...]
    batch_size: int = DEFAULT_BATCH_SIZE
    max_pixels: int = DEFAULT_MAX_PIXELS
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S
    decode_threads: int = DEFAULT_DECODE_THREADS
    intra_op_threads: int = 0
    cache_dir: str | None = None

    @property
    def recipe(self) -> FeatureRecipe:
        """The first (with one backbone, the only) recipe."""
        return self.recipes[0]

    @property
    def tables(self) -> list[tuple[FeatureRecipe, TableRun]]:
        """Each recipe with its table: ``run.output`` itself for one backbone, else
        ``run.output/<backbone>``."""
        if len(self.recipes) == 1:
            return [(self.recipe, self.run)]
        return [
            (r, dataclasses.replace(self.run, output=storage.join(self.run.output, r.backbone)))
            for r in self.recipes
        ]

    def __post_init__(self):
        if not self.recipes:
            raise ValueError("at least one backbone is required")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.max_pixels < 1:
            raise ValueError("--max-pixels must be >= 1")
        if self.read_timeout_s <= 0:
            raise ValueError(f"--read-timeout must be > 0 seconds, got {self.read_timeout_s:g}")
        if self.decode_threads < 0:
            raise ValueError(f"--decode-threads must be auto or >= 1, got {self.decode_threads}")
        if self.intra_op_threads < 0:
            raise ValueError("--intra-op-threads must be >= 0")


def _decode_threads(value: str) -> int:
    """``auto`` (:data:`AUTO_DECODE_THREADS`) or a count >= 1."""
    if value.strip().lower() == "auto":
        return AUTO_DECODE_THREADS
    try:
        threads = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a count, got {value!r}") from None
    if threads < 1:
        raise argparse.ArgumentTypeError(f"expected auto or a count >= 1, got {threads}")
    return threads


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(
        "pipeline.extract",
        description="Embed an image collection with a pretrained headless backbone (a Keras CNN "
        "or a KerasHub vision transformer; several at once with --backbone a,b) into Parquet "
        "feature tables. Other flags are Beam pipeline options (e.g. --runner, "
        "--direct_num_workers 2 --direct_running_mode multi_processing; --runner dask with "
        "--dask_client_address HOST:PORT, or --dask_local_workers N for a local cluster).",
    )
    parser.add_argument(
        "--input",
        action="append",
        default=[],
        help="folder, glob, gs:// prefix, or manifest (.csv/.tsv/.txt); repeatable; required "
        "unless --demo",
    )
    parser.add_argument(
        "--output", help="output folder for the table (local or gs://); required unless --demo"
    )
    recipe_flags.add_recipe_flags(parser)
    cli.add_batch_size_flag(parser)
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="larger images become error rows (a decompression-bomb guard) (default: %(default)s)",
    )
    parser.add_argument(
        "--read-timeout",
        type=float,
        default=DEFAULT_READ_TIMEOUT_S,
        metavar="SECONDS",
        help="an image whose file is not read within this time (a stalled mount or bucket) "
        "becomes an error row and the run goes on (default: %(default)s)",
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
        action=cli.Switch,
        help="incremental mode: also retry images whose earlier attempt is in _errors/",
    )
    parser.add_argument(
        "--prune",
        action=cli.Switch,
        help="incremental mode: remove the rows and error rows of images no longer listed "
        "(a dataset that deletes files)",
    )
    parser.add_argument(
        "--plan-only",
        action=cli.Switch,
        help="print what the run would do (listed, to embed, kept, stale, unlisted, skipped) "
        "and change nothing",
    )
    parser.add_argument(
        "--include-all-files",
        action=cli.Switch,
        help="list every file of a folder as an input, not only images (non-images then "
        "become error rows)",
    )
    parser.add_argument(
        "--stat-manifest",
        action=cli.Switch,
        help="stat the URIs of manifests without file_size/file_version columns, in parallel, "
        "so incremental runs notice changed files",
    )
    parser.add_argument(
        "--decode-threads",
        type=_decode_threads,
        default=DEFAULT_DECODE_THREADS,
        metavar="auto|N",
        help="image decoding threads per worker process, overlapping the model; auto (the "
        "default): the process's share of cores, less one for the model when it runs on a GPU",
    )
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="TensorFlow threads per worker process (default: all cores for one process, "
        "an equal share when --direct_num_workers processes share the machine)",
    )
    cli.add_overwrite_flag(parser, "table")
    cli.add_allow_empty_flag(parser, prune=True)
    parser.add_argument(
        "--break-lease",
        action=cli.Switch,
        help="take the table over from a run that still holds its lease (use when that run "
        "is known to be dead)",
    )
    parser.add_argument(
        "--lease-expiry",
        type=float,
        default=DEFAULT_EXPIRY_S,
        help="seconds without a heartbeat after which a run's lease is taken over "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="worker cache for remote weight files (default: $FEATUREBEAM_CACHE or ~/.cache/featurebeam)",
    )
    parser.add_argument(
        "--demo",
        action=cli.Switch,
        help="embed scikit-image's sample photos with the offline real MobileNetV2 "
        "(--backbone mobilenet_v2 --weights sample) into ./out/demo unless given other flags",
    )
    return parser


def parse_args(argv: Sequence[str] | None) -> tuple[ExtractConfig, list[str]]:
    """Parses our flags; returns the config and the remaining (Beam) flags.

    Raises:
        SystemExit: on bad flags, with argparse's usage message.
    """
    parser = build_parser()
    args, beam_args = cli.parse_known(parser, argv)
    if args.demo:
        args.input = args.input or [demo_images_dir()]
        args.output = args.output or os.path.join("out", "demo")
        args.weights = args.weights or "sample"
        args.overwrite = True
    if not args.input:
        parser.error("--input is required (or --demo)")
    if not args.output:
        parser.error("--output is required (or --demo)")
    try:
        run = TableRun(
            inputs=tuple(args.input),
            output=args.output,
            mode=args.mode,
            chunk_size=args.chunk_size,
            retry_errors=args.retry_errors,
            prune=args.prune,
            overwrite=args.overwrite,
            plan_only=args.plan_only,
            include_all_files=args.include_all_files,
            stat_manifest=args.stat_manifest,
            break_lease=args.break_lease,
            lease_expiry_s=args.lease_expiry,
            allow_empty=args.allow_empty,
        )
        config = ExtractConfig(
            run=run,
            recipes=tuple(recipe_flags.recipes_from_args(args)),
            batch_size=args.batch_size,
            max_pixels=args.max_pixels,
            read_timeout_s=args.read_timeout,
            decode_threads=args.decode_threads,
            intra_op_threads=args.intra_op_threads,
            cache_dir=args.cache_dir,
        )
    except ValueError as exc:
        parser.error(str(exc))
    return config, beam_args
