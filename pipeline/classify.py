"""Classify images: a backbone with its ImageNet top, a backbone plus a trained head, or a
text-image backbone (CLIP, SigLIP) zero-shot against any labels.

    python -m pipeline.classify --input DIR --output OUT --backbone resnet50 --weights imagenet --top-k 5
    python -m pipeline.classify --input DIR --output OUT --head HEAD_DIR --top-k 2
    python -m pipeline.classify --input DIR --output OUT --backbone siglip2_base_patch16_224 \
        --labels ants,bees --prompt "a photo of {}."

Runs the same Beam read/decode path as extraction and writes a Parquet table of predictions,
``OUT/predictions-*.parquet`` (``prediction``, ``probability``, ``top_classes``,
``top_probabilities`` per image), with the same error rows and ``_SUMMARY.json``; it prints the
first predictions and the count per predicted label. An ``OUT`` that holds a table is refused
unless ``--overwrite``. With ``--head``, images are made into vectors with exactly the
recipe the head was trained on (backbone, weights, size, pooling, resize, precision), read from
the head's report; a recipe flag that contradicts it is refused. With ``--labels`` (or
``--labels-file``, one label per line), each label becomes a prompt (``--prompt``, ``{}`` is the
label) embedded once by the backbone's text tower; an image's probabilities are the backbone's own
head over those prompts (softmax for CLIP, per-label sigmoid for SigLIP, as each was trained).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

from pipeline import cli, recipe_flags
from pipeline.launch import TableRun, launch
from transforms import model_io, storage, table
from transforms.classify import PREDICTION_SCHEMA, TopK, imagenet_class_names, preview
from transforms.embed.handler import BackboneModelHandler
from transforms.extract import ExtractFeatures
from transforms.models import zero_shot
from transforms.models.recipe import FeatureRecipe
from transforms.models.specs import PREDICTIONS
from transforms.models.weights.check import check_weights
from transforms.table_job import run_metadata


def build_parser() -> argparse.ArgumentParser:
    parser = cli.parser(
        "pipeline.classify",
        description=cli.plain(__doc__) + " Other flags are Beam pipeline options.",
    )
    parser.add_argument(
        "--input", action="append", required=True, help="as for featurebeam extract"
    )
    parser.add_argument("--output", required=True, help="folder for the predictions table")
    parser.add_argument(
        "--head",
        default=None,
        help="a featurebeam train-head --model-dir (default: none, the ImageNet top)",
    )
    prompts = parser.add_argument_group("zero-shot (CLIP / SigLIP backbones)")
    prompts.add_argument(
        "--labels", default=None, help="comma-separated class labels (default: none)"
    )
    prompts.add_argument(
        "--labels-file", default=None, help="a text file, one label per line (default: none)"
    )
    prompts.add_argument(
        "--prompt",
        default=zero_shot.DEFAULT_PROMPT,
        help="the text for each label, {} standing for it (default: %(default)r)",
    )
    recipe_flags.add_recipe_flags(parser)
    parser.add_argument("--top-k", type=int, default=5, help="predictions kept per image")
    cli.add_batch_size_flag(parser)
    cli.add_overwrite_flag(parser, "table")
    cli.add_allow_empty_flag(parser)
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="worker cache for remote weight files (default: $FEATUREBEAM_CACHE or ~/.cache/featurebeam)",
    )
    return parser


def _labels(args) -> list[str]:
    if args.labels and args.labels_file:
        raise ValueError("give --labels or --labels-file, not both")
    if args.labels_file:
        text = storage.read_bytes(args.labels_file).decode("utf-8")
        labels = [line.strip() for line in text.splitlines()]
    else:
        labels = [label.strip() for label in (args.labels or "").split(",")]
    labels = [label for label in labels if label]
    if len(labels) < 2:
        raise ValueError(f"zero-shot classification needs at least 2 labels, got {labels}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate labels: {labels}")
    return labels


def _handler_and_classes(args, parser) -> tuple[BackboneModelHandler, list[str], dict[str, str]]:
    try:
        if args.labels or args.labels_file:
            if args.head:
                raise ValueError("--labels (zero-shot) and --head are alternatives")
            labels = _labels(args)
            if args.pooling not in (None, "cls") or args.l2_normalize:
                raise ValueError(
                    "zero-shot scores the cls embedding: leave out --pooling/--l2-normalize"
                )
            recipe = FeatureRecipe.from_flags(**recipe_flags.given(args))  # cls by default
            zero_shot.check_zero_shot(recipe)
            handler = BackboneModelHandler(
                recipe,
                batch_size=args.batch_size,
                cache_dir=args.cache_dir,
                prompts=zero_shot.prompts_for(labels, args.prompt),
            )
            return handler, labels, {"prompt": args.prompt}
        if args.head:
            report = model_io.read_head_report(args.head)
            recipe = model_io.head_recipe(report)
            recipe.check_flags(**recipe_flags.given(args))
            classes = report["classes"]
            handler = BackboneModelHandler(
                recipe,
                batch_size=args.batch_size,
                cache_dir=args.cache_dir,
                head=model_io.head_file(args.head),
                head_classes=len(classes),
            )
            extra = {"head": args.head, "head_fingerprint": report["feature_table_fingerprint"]}
            return handler, classes, extra
        if args.layer not in (None, PREDICTIONS):
            parser.error(f"without --head the ImageNet top is used: --layer must be {PREDICTIONS}")
        flags = {**recipe_flags.given(args), "layer": PREDICTIONS, "pooling": None}
        recipe = FeatureRecipe.from_flags(**flags)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    handler = BackboneModelHandler(recipe, batch_size=args.batch_size, cache_dir=args.cache_dir)
    return handler, imagenet_class_names(), {"head": "imagenet"}


def run(argv: Sequence[str] | None = None, test_pipeline=None) -> dict[str, Any]:
    parser = build_parser()
    args, beam_args = cli.parse_known(parser, argv)
    if args.top_k < 1:
        parser.error("--top-k must be >= 1")
    handler, classes, extra = _handler_and_classes(args, parser)
    check_weights(handler.recipe, cache=args.cache_dir)  # one line, before the lease and Beam
    metadata = run_metadata(handler, {**extra, "classes": json.dumps(classes)})
    started = time.monotonic()

    def build(pipeline, planned, lease):
        return pipeline | "ClassifyImages" >> ExtractFeatures(
            planned,
            model_handler=handler,
            metadata=metadata,
            to_row=TopK(args.top_k, classes),
            schema=PREDICTION_SCHEMA,
            lease=lease,
            prefix=table.PREDICTIONS,
        )

    if not args.overwrite and table.shard_files(args.output):
        # Said here, not by the planner: its message names extract's --mode incremental.
        raise FileExistsError(
            f"--output {args.output} already holds a table; pass --overwrite to replace it, "
            "or choose another --output"
        )

    summary = launch(
        TableRun(
            inputs=tuple(args.input),
            output=args.output,
            overwrite=args.overwrite,
            allow_empty=args.allow_empty,
        ),
        metadata=metadata,
        build=build,
        beam_args=beam_args,
        test_pipeline=test_pipeline,
        command="classify",
    )
    summary.update(seconds=time.monotonic() - started, output=args.output)
    summary["preview"] = preview(args.output)
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    summary = cli.run_main(run, argv)
    meta = summary["metadata"]
    out = summary["output"]
    print(f"inputs {summary['inputs']} = rows {summary['rows']} + errors {summary['errors']}")
    print(
        f"classifier: {meta['backbone']} ({meta['resize']}, {meta['precision']}) + {meta['head']}, "
        f"{summary['seconds']:.1f} s"
    )
    shown = summary["preview"]
    if shown["first"]:
        width = max(len(_file_name(r["uri"])) for r in shown["first"])
        print(f"first {len(shown['first'])} of {summary['rows']} predictions (by file):")
        for r in shown["first"]:
            print(f"  {_file_name(r['uri']):<{width}}  {r['prediction']}  {r['probability']:.3f}")
        counts = ", ".join(f"{label} {n}" for label, n in shown["counts"].items())
        print(f"predicted labels: {counts}")
    print(
        f"predictions: {out}/{table.PREDICTIONS}-*.parquet "
        "(uri, prediction, probability, top_classes, top_probabilities)"
    )
    print(f"errors: {out}/_errors/errors-*.parquet")


def _file_name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


if __name__ == "__main__":
    main()
