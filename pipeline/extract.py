"""Extraction job: images -> pretrained headless CNN -> Parquet feature table.

    python -m pipeline.extract --input DIR_GLOB_OR_gs:// --output OUT_DIR \\
        --backbone resnet50 --weights imagenet --pooling avg [Beam flags]
    python -m pipeline.extract --demo     # offline: sample photos, real MobileNetV2 weights

See ``python -m pipeline.extract --help``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import apache_beam as beam

from pipeline import cli, runners
from pipeline.config import ExtractConfig, parse_args
from pipeline.launch import launch
from transforms import lease as leases
from transforms import plan as plans
from transforms import table
from transforms.embed import BackboneModelHandler
from transforms.extract import ExtractFeatures, run_metadata


def model_handler(config: ExtractConfig, *, processes_per_machine: int = 1) -> BackboneModelHandler:
    threads = config.intra_op_threads or runners.thread_share(processes_per_machine)
    return BackboneModelHandler(
        config.recipe,
        batch_size=config.batch_size,
        cache_dir=config.cache_dir,
        intra_op_threads=threads,
    )


def build(
    pipeline: beam.Pipeline,
    config: ExtractConfig,
    run: plans.RunPlan,
    *,
    handler: BackboneModelHandler | None = None,
    lease: leases.Lease | None = None,
):
    """Adds the extraction graph for a planned run to ``pipeline``; returns the summary
    PCollection. Builds only: nothing is listed, read or written here."""
    handler = handler or model_handler(config)
    return pipeline | "ExtractFeatures" >> ExtractFeatures(
        run,
        model_handler=handler,
        metadata=run_metadata(handler),
        decode_threads=config.decode_threads,
        max_pixels=config.max_pixels,
        lease=lease,
    )


def run(
    argv: Sequence[str] | None = None, test_pipeline: beam.Pipeline | None = None
) -> dict[str, Any]:
    """Parses flags, plans, builds the graph, runs it; returns the table summary (or, with
    ``--plan-only``, the plan) plus ``seconds``, ``mode`` and ``output``."""
    config, beam_args = parse_args(argv)
    started = time.monotonic()
    processes = runners.local_processes(beam_args)
    handler = model_handler(config, processes_per_machine=processes)
    summary = launch(
        config.run,
        metadata=run_metadata(handler),
        build=lambda p, planned, lease: build(p, config, planned, handler=handler, lease=lease),
        beam_args=beam_args,
        test_pipeline=test_pipeline,
    )
    summary.update(
        seconds=time.monotonic() - started, mode=config.run.mode, output=config.run.output
    )
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    out = summary["output"]
    meta = summary["metadata"]
    rate = summary["inputs"] / summary["seconds"] if summary["seconds"] else 0.0
    run = summary.get("run", {})
    what = meta.get("layer") or "pooling=" + meta.get("pooling", "")
    lines = [
        f"inputs {summary['inputs']} = rows {summary['rows']} + errors {summary['errors']}"
        f"; skipped {summary.get('skipped', 0)} files that are not images",
        f"this run (mode {summary.get('mode', 'full')}): embedded {run.get('embedded', 0)} "
        f"images in {run.get('chunks', 0)} chunk(s) -> {run.get('new_rows', 0)} new rows, "
        f"{run.get('new_errors', 0)} new errors; kept {run.get('kept_rows', 0)} rows, "
        f"removed {run.get('stale_rows_removed', 0)} stale rows",
        f"unlisted rows: {run.get('unlisted_rows_kept', 0)} kept, "
        f"{run.get('unlisted_rows_removed', 0)} removed",
        f"backbone {meta['backbone']} ({what}), {meta['feature_dim']}-d vectors at "
        f"{meta['input_size']} px, resize {meta.get('resize')}, {meta.get('precision')}, "
        f"weights {meta['weights_fingerprint'][:23]}",
        f"{summary['seconds']:.1f} s wall time, {rate:.1f} images/s end to end (model load included)",
        f"table:  {out}/features-*.parquet ({len(summary['feature_files'])} shard(s), "
        f"{summary.get('table_rows', summary['rows'])} rows)",
        f"errors: {out}/_errors/errors-*.parquet",
        "read it:",
        f"  pandas: pd.read_parquet('{out}')   # the vectors are in the 'feature' column",
        f"  duckdb: SELECT uri, label, len(feature) FROM '{out}/features-*.parquet' LIMIT 5",
    ]
    if summary.get("skipped_examples"):
        lines.append(f"  skipped files, e.g. {', '.join(summary['skipped_examples'][:3])}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    cli.configure_logging()
    try:
        summary = run(argv)
    except (
        FileExistsError,
        FileNotFoundError,
        ValueError,
        leases.LeaseHeld,
    ) as exc:
        sys.exit(f"error: {exc}")
    if "plan" in summary:
        print(("dry run" if summary["dry_run"] else "plan only") + ", nothing was changed:")
        print(summary["plan"].describe())
        if summary["lease"]:
            print(f"the table is being written now by {summary['lease']}")
        return
    print(format_summary(summary))
    if summary["errors"]:
        import pyarrow.compute as pc

        errors = table.read_table(summary["output"], prefix=table.ERRORS)
        for stage in sorted(set(errors.column("stage").to_pylist())):
            subset = errors.filter(pc.equal(errors.column("stage"), stage))
            print(
                f"  {subset.num_rows} {stage} errors, e.g. {subset['uri'][0]}: {subset['reason'][0]}"
            )


if __name__ == "__main__":
    main()
