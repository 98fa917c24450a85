"""ExtractFeatures: the whole chain from image URIs to a committed feature table."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import apache_beam as beam
import pyarrow as pa

from transforms import table
from transforms.embed import DecodeImages, EmbedImages, FeatureModelHandler
from transforms.images import DEFAULT_MAX_PIXELS
from transforms.listing import ListImages

TOOL_VERSION = "0.1.0"


def _summary(_, *, inputs, rows, errors, feature_files, error_files, output_dir, metadata):
    summary = {
        "inputs": inputs,
        "rows": rows,
        "errors": errors,
        "feature_files": sorted(feature_files),
        "error_files": sorted(error_files),
        "metadata": metadata,
    }
    table.write_summary(output_dir, summary)
    return summary


class ExtractFeatures(beam.PTransform):
    """Chains ``ListImages`` -> ``DecodeImages`` -> ``EmbedImages`` -> two ``WriteTable``\\ s.

    Feature rows go to ``features-*.parquet``, read/decode/embed failures to
    ``_errors/errors-*.parquet``,
    and ``_SUMMARY.json`` records ``inputs``, ``rows`` and ``errors`` (always
    ``inputs == rows + errors``) once both tables are committed.

    Args:
        sources: folders, globs, manifests or files, local or ``gs://``.
        output_dir: where the table is written.
        model_handler: the RunInference handler (``BackboneModelHandler`` in production).
        resize: ``squash`` or ``crop`` (see ``transforms.images.load_image``).
        max_pixels: decompression-bomb guard.
        num_shards: fixed feature shard count; 0 sizes shards from the row count.
        extra_metadata: more key-values for the table metadata (e.g. the job's options).
        to_row: maps each feature row to the row actually written (e.g. top-k predictions).
        schema: the schema of ``to_row``'s rows (metadata is added); default: feature rows.

    Returns:
        A PCollection with the one summary dict.
    """

    def __init__(
        self,
        sources: str | Sequence[str],
        output_dir: str,
        *,
        model_handler: FeatureModelHandler,
        resize: str = "squash",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        num_shards: int = 0,
        extra_metadata: dict[str, str] | None = None,
        to_row: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        schema: pa.Schema | None = None,
    ):
        super().__init__()
        self._sources = sources
        self._output_dir = output_dir
        self._handler = model_handler
        self._resize = resize
        self._max_pixels = max_pixels
        self._num_shards = num_shards
        self._to_row = to_row
        self._schema = schema
        self._metadata = {
            **model_handler.table_metadata(),
            "resize": resize,
            "tool_version": TOOL_VERSION,
            **(extra_metadata or {}),
        }

    def expand(self, pbegin):
        refs = pbegin | "ListImages" >> ListImages(self._sources)
        decoded = refs | "DecodeImages" >> DecodeImages(
            self._handler.input_size, resize=self._resize, max_pixels=self._max_pixels
        )
        embedded = decoded["decoded"] | "EmbedImages" >> EmbedImages(self._handler)
        errors = (decoded["errors"], embedded["errors"]) | "AllErrors" >> beam.Flatten()

        rows = embedded["rows"]
        if self._to_row is not None:
            rows = rows | "ToOutputRows" >> beam.Map(self._to_row)
        schema = table.feature_schema(self._handler.feature_dim, self._metadata)
        if self._schema is not None:
            schema = self._schema.with_metadata(schema.metadata)
        feature_files = rows | "WriteFeatureTable" >> table.WriteTable(
            self._output_dir, schema=schema, prefix=table.FEATURES, num_shards=self._num_shards
        )
        error_files = errors | "WriteErrorTable" >> table.WriteTable(
            table.table_dir_for(self._output_dir, table.ERRORS),
            schema=table.ERROR_SCHEMA,
            prefix=table.ERRORS,
            num_shards=1,
        )

        def count(pcoll, label):
            return beam.pvalue.AsSingleton(pcoll | label >> beam.combiners.Count.Globally())

        return (
            pbegin
            | "SummaryTrigger" >> beam.Create([None])
            | "WriteSummary"
            >> beam.Map(
                _summary,
                inputs=count(refs, "CountInputs"),
                rows=count(rows, "CountRows"),
                errors=count(errors, "CountErrors"),
                feature_files=beam.pvalue.AsList(feature_files),
                error_files=beam.pvalue.AsList(error_files),
                output_dir=self._output_dir,
                metadata=self._metadata,
            )
        )
