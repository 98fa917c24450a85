"""Extraction job: images -> pretrained headless backbone -> Parquet feature table.

    python -m pipeline.extract --input DIR_GLOB_OR_gs:// --output OUT_DIR \\
        --backbone resnet50 --weights imagenet --pooling avg [Beam flags]
    python -m pipeline.extract --input ... --output OUT --backbone dinov2_small,resnet50
        # one read and decode pass, one table per backbone: OUT/dinov2_small/, OUT/resnet50/
    python -m pipeline.extract --demo     # offline: sample photos, real MobileNetV2 weights

See ``python -m pipeline.extract --help``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import apache_beam as beam

from pipeline import cli, runners
from pipeline.config import ExtractConfig, parse_args
from pipeline.launch import launch_tables
from transforms import lease as leases
from transforms import plan as plans
from transforms import startup, table
from transforms.devices import check_models_fit
from transforms.embed.handler import BackboneModelHandler
from transforms.extract import ExtractFeatureTables
from transforms.listing import describe_skipped
from transforms.models.recipe import FeatureRecipe
from transforms.models.weights.check import check_weights
from transforms.table_job import run_metadata, table_job


def model_handler(
    config: ExtractConfig, recipe: FeatureRecipe, *, processes_per_machine: int = 1
) -> BackboneModelHandler:
    threads = config.intra_op_threads or runners.thread_share(processes_per_machine)
    return BackboneModelHandler(
        recipe,
        batch_size=config.batch_size,
        cache_dir=config.cache_dir,
        intra_op_threads=threads,
    )


def build(
    pipeline: beam.Pipeline,
    config: ExtractConfig,
    runs: Sequence[plans.RunPlan],
    *,
    handlers: Sequence[BackboneModelHandler] | None = None,
    leases_held: Sequence[leases.Lease | None] | None = None,
    processes_per_machine: int = 1,
):
    """Adds the extraction graph for planned runs (one per table, sharing their chunks) to
    ``pipeline``; returns the summaries PCollection. Builds only: nothing is listed, read or
    written here."""
    handlers = handlers or [model_handler(config, recipe) for recipe in config.recipes]
    leases_held = leases_held or [None] * len(runs)
    jobs = [
        table_job(run, handler, run_metadata(handler), lease=lease)
        for run, handler, lease in zip(runs, handlers, leases_held, strict=True)
    ]
    return pipeline | "ExtractFeatures" >> ExtractFeatureTables(
        jobs,
        decode_threads=config.decode_threads,
        max_pixels=config.max_pixels,
        read_timeout_s=config.read_timeout_s,
        processes_per_machine=processes_per_machine,
    )


def run(
    argv: Sequence[str] | None = None, test_pipeline: beam.Pipeline | None = None
) -> dict[str, Any]:
    """Parses flags, plans, builds the graph, runs it; returns the table summary (or, with
    ``--plan-only``, the plan) plus ``seconds``, ``mode`` and ``output``. A multi-backbone run
    returns ``{"tables": [summary per backbone], "seconds", "mode", "output"}``."""
    startup.mark("imports")
    config, beam_args = parse_args(argv)
    if not config.run.plan_only:
        for recipe in config.recipes:  # before the lease, the plan and Beam: one line if bad
            check_weights(recipe, cache=config.cache_dir)
    started = time.monotonic()
    processes = runners.local_processes(beam_args)
    handlers = [
        model_handler(config, recipe, processes_per_machine=processes) for recipe in config.recipes
    ]
    if len(handlers) > 1:
        check_models_fit(config.recipes, processes_per_machine=processes)
    specs = [spec for _, spec in config.tables]
    summaries = launch_tables(
        specs,
        metadatas=[run_metadata(h) for h in handlers],
        build=lambda p, runs, held: build(
            p, config, runs, handlers=handlers, leases_held=held, processes_per_machine=processes
        ),
        beam_args=beam_args,
        test_pipeline=test_pipeline,
        command="extract",
    )
    seconds = time.monotonic() - started
    for summary, spec, recipe in zip(summaries, specs, config.recipes, strict=True):
        summary.update(seconds=seconds, mode=config.run.mode, output=spec.output)
        summary.setdefault("backbone", recipe.backbone)
        summary["startup"] = startup.marks()  # this process's; empty steps ran in other workers
    if len(summaries) == 1:
        return summaries[0]
    return {
        "tables": summaries,
        "seconds": seconds,
        "mode": config.run.mode,
        "output": config.run.output,
    }


def format_summary(summary: dict[str, Any]) -> str:
    out = summary["output"]
    meta = summary["metadata"]
    rate = summary["inputs"] / summary["seconds"] if summary["seconds"] else 0.0
    # A run that embedded nothing (every image kept) has no rate worth printing.
    run = summary.get("run", {})
    what = meta.get("layer") or "pooling=" + meta.get("pooling", "")
    lines = [
        f"inputs {summary['inputs']} = rows {summary['rows']} + errors {summary['errors']}"
        f"; {_skipped(summary)}",
        f"this run (mode {summary.get('mode', 'full')}): embedded {run.get('embedded', 0)} "
        f"images in {run.get('chunks', 0)} chunk(s) -> {run.get('new_rows', 0)} new rows, "
        f"{run.get('new_errors', 0)} new errors; kept {run.get('kept_rows', 0)} rows, "
        f"removed {run.get('stale_rows_removed', 0)} stale rows",
        f"unlisted rows: {run.get('unlisted_rows_kept', 0)} kept, "
        f"{run.get('unlisted_rows_removed', 0)} removed",
        f"backbone {meta['backbone']} ({what}), {meta['feature_dim']}-d vectors at "
        f"{meta['input_size']} px, resize {meta.get('resize')}, {meta.get('precision')}, "
        f"weights {meta['weights_fingerprint'][:23]}",
        f"{summary['seconds']:.1f} s wall time, "
        + (
            f"{rate:.1f} images/s end to end (model load included)"
            if run.get("embedded", 0)
            else "nothing embedded"
        ),
        f"table:  {out}/features-*.parquet ({len(summary['feature_files'])} shard(s), "
        f"{summary.get('table_rows', summary['rows'])} rows)",
        f"errors: {out}/_errors/errors-*.parquet",
        *_read_it(out),
    ]
    return "\n".join(lines + _listing_notes(summary))


def _read_it(out: str, title: str = "read it:") -> list[str]:
    return [
        title,
        f"  pandas: pd.read_parquet('{out}')   # the vectors are in the 'feature' column",
        f"  duckdb: SELECT uri, label, len(feature) FROM '{out}/features-*.parquet' LIMIT 5",
    ]


def _skipped(summary: dict[str, Any]) -> str:
    reasons = summary.get("skipped_reasons")
    why = f" ({describe_skipped(reasons.items())})" if reasons else ""
    return f"skipped {summary.get('skipped', 0)} files{why}"


def _listing_notes(summary: dict[str, Any]) -> list[str]:
    """What the listing passed over: skipped files and URIs listed with conflicting labels."""
    lines = []
    if summary.get("skipped_examples"):
        lines.append(f"  skipped files, e.g. {', '.join(summary['skipped_examples'][:3])}")
    if summary.get("label_conflicts"):
        lines.append(
            f"  {summary['label_conflicts']} URIs listed with conflicting labels (each keeps its "
            f"first label), e.g. {', '.join(summary['label_conflict_examples'][:3])}"
        )
    return lines


def format_tables(result: dict[str, Any]) -> str:
    """A multi-backbone run's summary: what the pass did once, then one row per table."""
    tables = result["tables"]
    first = tables[0]
    embedded = first["run"].get("pass_images", 0)
    rate = embedded / result["seconds"] if result["seconds"] else 0.0
    lines = [
        f"inputs {first['inputs']}; {_skipped(first)}",
        f"this run (mode {result['mode']}): {len(tables)} backbones in one pass, embedded "
        f"{embedded} images in {first['run'].get('chunks', 0)} chunk(s)",
        f"{result['seconds']:.1f} s wall time, "
        + (
            f"{rate:.1f} images/s end to end (model load included)"
            if embedded
            else "nothing embedded"
        ),
    ]
    lines += _listing_notes(first)
    header = ("backbone", "vectors", "px", "weights", "rows", "errors", "new rows", "new errors")
    header += ("kept", "removed", "table")
    rows = []
    for one in tables:
        meta, run = one["metadata"], one.get("run", {})
        removed = run.get("stale_rows_removed", 0) + run.get("unlisted_rows_removed", 0)
        rows.append(
            (
                meta["backbone"],
                f"{meta['feature_dim']}-d " + (meta.get("layer") or meta.get("pooling", "")),
                str(meta["input_size"]),
                meta["weights_fingerprint"][:23],
                str(one["rows"]),
                str(one["errors"]),
                str(run.get("new_rows", 0)),
                str(run.get("new_errors", 0)),
                str(run.get("kept_rows", 0)),
                str(removed),
                f"{one['output']}/features-*.parquet",
            )
        )
    lines.append(cli.text_table(header, rows, right={2, 4, 5, 6, 7, 8, 9}))
    out = first["output"]
    lines += [
        "errors: <table>/_errors/errors-*.parquet; rows + errors = inputs in every table",
        *_read_it(out, "read it (one table per backbone):"),
    ]
    return "\n".join(lines)


def format_plans(plans_of: Sequence[dict[str, Any]]) -> str:
    """A multi-backbone ``--plan-only``: what the listing found once, then one row per table."""
    runs = [one["plan"] for one in plans_of]
    first = runs[0]
    lines = [
        _plan_heading(plans_of[0]),
        first.describe().splitlines()[0],
        f"to embed: {first.pass_images} images in {first.num_chunks} chunk(s) for "
        f"{len(runs)} backbones",
    ]
    header = ("backbone", "to embed", "new", "changed", "kept rows", "kept errors", "stale")
    header += ("unlisted rows", "table")
    rows = [
        (
            name,
            *(
                str(n)
                for n in (
                    run.to_embed,
                    run.new,
                    run.changed,
                    run.kept_rows,
                    run.kept_errors,
                    run.stale_rows,
                    run.unlisted_rows,
                )
            ),
            run.output_dir,
        )
        for name, run in zip([one["backbone"] for one in plans_of], runs, strict=True)
    ]
    lines.append(cli.text_table(header, rows, right=set(range(1, 8))))
    lines.append(f"unlisted rows are {'removed (--prune)' if first.pruned else 'kept'}")
    for one in plans_of:
        if one["lease"] and not one.get("submitted"):
            lines.append(f"{one['plan'].output_dir} is being written now by {one['lease']}")
    return "\n".join(lines)


def _plan_heading(summary: dict[str, Any]) -> str:
    """What a summary that holds a plan is: a submitted job's, a dry run's or ``--plan-only``'s."""
    if summary.get("submitted"):
        return (
            f"submitted: the job is written to {summary['submitted']}; its workers write the "
            "table and give the lease back (this launch does not wait for them):"
        )
    return ("dry run" if summary["dry_run"] else "plan only") + ", nothing was changed:"


def main(argv: Sequence[str] | None = None) -> None:
    summary = cli.run_main(run, argv)
    tables = summary.get("tables")
    if not tables:
        _print_summary(summary)
    elif "plan" in tables[0]:
        print(format_plans(tables))
    else:
        print(format_tables(summary))
        for one in tables:
            _print_errors(one, prefix=f"{one['metadata']['backbone']}: ")


def _print_summary(summary: dict[str, Any]) -> None:
    if "plan" in summary:
        print(_plan_heading(summary))
        print(summary["plan"].describe())
        if summary["lease"] and not summary.get("submitted"):
            print(f"the table is being written now by {summary['lease']}")
        return
    print(format_summary(summary))
    _print_errors(summary)


def _print_errors(summary: dict[str, Any], prefix: str = "") -> None:
    """One line per failing stage: how many, and the first image with its reason."""
    if not summary["errors"]:
        return
    import pyarrow.compute as pc

    errors = table.read_table(summary["output"], prefix=table.ERRORS)
    for stage in sorted(set(errors.column("stage").to_pylist())):
        subset = errors.filter(pc.equal(errors.column("stage"), stage))
        print(
            f"  {prefix}{subset.num_rows} {stage} errors, e.g. {subset['uri'][0]}: "
            f"{subset['reason'][0]}"
        )


if __name__ == "__main__":
    main()
