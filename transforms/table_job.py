"""One table a run writes (:class:`TableJob`): its plan, the handler that makes its vectors, its
metadata and row schema; and the metadata every table records (:func:`run_metadata`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from transforms import plan as plans
from transforms import table
from transforms.embed.handler import FeatureModelHandler
from transforms.images import Target
from transforms.lease import Lease


def tool_version() -> str:
    """The installed package's version (``pyproject.toml`` is the one place it is written)."""
    from importlib import metadata

    try:
        return metadata.version("featurebeam")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def run_metadata(
    handler: FeatureModelHandler, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """The table metadata of a run: the handler's recipe, the tool version, and ``extra``."""
    return {**handler.table_metadata(), "tool_version": tool_version(), **(extra or {})}


@dataclasses.dataclass(frozen=True)
class TableJob:
    """One table a run writes: its plan, the handler that makes its vectors, its metadata and
    row schema, how feature rows become written rows, and its lease.

    Build it with :func:`table_job`. A multi-backbone run has one per backbone.
    """

    run: plans.RunPlan
    handler: FeatureModelHandler
    metadata: dict[str, str]
    schema: pa.Schema
    to_row: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    lease: Lease | None = None
    #: What the row shards are named for (``features``; ``predictions`` for classify).
    prefix: str = table.FEATURES

    @property
    def target(self) -> Target:
        """What this table needs from each image; tables that agree on it share the pixels."""
        h = self.handler
        return Target(tuple(h.input_size), h.resize, h.interpolation)


def table_job(
    run: plans.RunPlan,
    handler: FeatureModelHandler,
    metadata: dict[str, str],
    *,
    to_row: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    schema: pa.Schema | None = None,
    lease: Lease | None = None,
    prefix: str = table.FEATURES,
) -> TableJob:
    """A :class:`TableJob`; ``schema`` is that of ``to_row``'s rows (default: feature rows),
    with the table metadata added; ``prefix`` names its row shards (``table.ROW_PREFIXES``)."""
    metadata = dict(metadata)
    features = table.feature_schema(handler.feature_dim, metadata)
    schema = features if schema is None else schema.with_metadata(features.metadata)
    return TableJob(run, handler, metadata, schema, to_row, lease, prefix)
