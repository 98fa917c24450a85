"""The report page: one self-contained HTML file drawn from a :class:`ReportData`
(``transforms.report_data.gather``), with its charts and thumbnails.

Plotly draws the map and the charts (its JavaScript is inlined once), thumbnails are small JPEG
data URIs, and nothing is fetched when the page is opened. When the map holds a sample of the rows
the page says so.
"""

import base64
import html
import io
import json
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from transforms import splits, storage
from transforms.report_data import ReportData

MAX_GROUPS = 30
MAX_MISCLASSIFIED = 60
MAX_ERRORS = 100
THUMBNAIL_PX = 96


def thumbnail(data: bytes, *, size: int = THUMBNAIL_PX) -> str | None:
    """A JPEG data URI of at most ``size`` px a side, EXIF orientation applied; None when the
    bytes are not an image Pillow can decode."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (size, size))  # JPEG: decode at 1/2-1/8 scale, much faster
            image = ImageOps.exif_transpose(image).convert("RGB")
            image.thumbnail((size, size))
            out = io.BytesIO()
            image.save(out, "JPEG", quality=75)
    except Exception:  # noqa: BLE001 - any undecodable input means "no thumbnail"
        return None
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


def thumbnails(uris: Iterable[str], *, threads: int = 8) -> dict[str, str | None]:
    """Thumbnails of many images, read in parallel (remote reads are mostly waiting)."""

    def one(uri):
        try:
            return uri, thumbnail(storage.read_bytes(uri))
        except OSError:
            return uri, None

    wanted = sorted(set(uris))
    with ThreadPoolExecutor(threads) as pool:
        return dict(pool.map(one, wanted))


# --- the page ---------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1180px; padding: 16px;
       color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ddd; }
.kv { columns: 2; column-gap: 32px; } .kv div { overflow-wrap: anywhere; }
.kv span { color: #666; display: inline-block; min-width: 130px; }
table.list td, table.list th { padding: 2px 10px 2px 0; vertical-align: top; text-align: left; }
table.list { border-collapse: collapse; } table.list tr { border-bottom: 1px solid #eee; }
.note { color: #666; } .counts span { margin-right: 18px; } .counts b { font-size: 18px; }
.strip { display: flex; gap: 6px; margin: 6px 0; align-items: flex-start; }
figure { margin: 0; width: 100px; font-size: 11px; color: #555; overflow-wrap: anywhere; }
figure img, figure .none { width: 96px; height: 96px; object-fit: contain; background: #f3f3f3;
       display: block; }
figure .none { display: flex; align-items: center; justify-content: center; color: #999; }
figure.query img { outline: 3px solid #1f77b4; }
.group { border: 1px solid #ddd; padding: 6px; margin: 8px 0; border-radius: 4px; }
.group.cross { border: 2px solid #d62728; background: #fff5f5; }
.tag { font-size: 12px; padding: 1px 6px; border-radius: 3px; background: #d62728; color: #fff; }
.grid { display: flex; flex-wrap: wrap; gap: 8px; }
"""


def _or(value: str | None, missing: str) -> str:
    return missing if value is None else str(value)


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _figure(uri: str, thumbs: dict[str, str | None], caption: str, *, cls: str = "") -> str:
    src = thumbs.get(uri)
    picture = (
        f'<img src="{src}" alt="{_e(_name(uri))}" loading="eager">'
        if src
        else '<div class="none">no thumbnail</div>'
    )
    return (
        f'<figure class="{cls}" title="{_e(uri)}">{picture}<figcaption>{caption}</figcaption>'
        "</figure>"
    )


def _plot(fig, div_id: str) -> str:
    import plotly.io as pio

    return pio.to_html(
        fig,
        full_html=False,
        include_plotlyjs=False,
        div_id=div_id,
        config={"displaylogo": False, "responsive": True},
    )


def _map_figure(data: ReportData):
    import plotly.graph_objects as go

    labels = data.rows.column("label").take(pa.array(data.sample)).to_pylist()
    uris = data.rows.column("uri").take(pa.array(data.sample)).to_pylist()
    splits = data.rows.column("split").take(pa.array(data.sample)).to_pylist()
    fig = go.Figure()
    by_label: dict[str | None, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    for name, at in sorted(by_label.items(), key=lambda item: str(item[0])):
        fig.add_trace(
            go.Scatter(
                x=data.points[at, 0],
                y=data.points[at, 1],
                mode="markers",
                name=_or(name, "(no label)"),
                marker={"size": 6, "opacity": 0.75},
                hovertext=[
                    f"{_e(uris[i])}<br>label: {_e(labels[i])}<br>split: {_e(splits[i])}" for i in at
                ],
                hoverinfo="text",
            )
        )
    fig.update_layout(
        height=560,
        margin={"l": 40, "r": 10, "t": 10, "b": 40},
        xaxis_title="principal component 1",
        yaxis_title="principal component 2",
        legend_title="label",
    )
    return fig


def _distribution_figure(data: ReportData):
    import plotly.graph_objects as go

    labels = data.rows.column("label").to_pylist()
    splits = data.rows.column("split").to_pylist()
    counts = Counter(zip(labels, splits, strict=True))
    names = sorted({label for label, _ in counts}, key=str)
    fig = go.Figure()
    for split in sorted({split for _, split in counts}, key=str):
        fig.add_trace(
            go.Bar(
                x=[_or(name, "(no label)") for name in names],
                y=[counts.get((name, split), 0) for name in names],
                name=_or(split, "(no split)"),
            )
        )
    fig.update_layout(
        barmode="group",
        height=320,
        margin={"l": 40, "r": 10, "t": 10, "b": 40},
        xaxis_title="label",
        yaxis_title="rows",
        legend_title="split",
    )
    return fig


def _head_figures(head: dict[str, Any]):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    classes = head["classes"]
    confusion = go.Figure(
        go.Heatmap(
            z=head["confusion_matrix"],
            x=classes,
            y=classes,
            colorscale="Blues",
            texttemplate="%{z}",
            hovertemplate="true %{y}, predicted %{x}: %{z}<extra></extra>",
        )
    )
    confusion.update_layout(
        height=260 + 30 * len(classes),
        width=320 + 40 * len(classes),
        xaxis_title="predicted",
        yaxis_title="true",
        yaxis_autorange="reversed",
        margin={"l": 60, "r": 10, "t": 10, "b": 50},
    )
    history = head.get("history")
    if not history:
        return confusion, None
    curves = make_subplots(rows=1, cols=2, subplot_titles=("loss", "accuracy"))
    for col, key in enumerate(("loss", "accuracy"), start=1):
        for prefix, name in (("", "train"), ("val_", "validation")):
            values = history.get(prefix + key)
            if values:
                curves.add_trace(
                    go.Scatter(
                        x=list(range(1, len(values) + 1)),
                        y=values,
                        mode="lines",
                        name=f"{name} {key}",
                    ),
                    row=1,
                    col=col,
                )
    curves.update_xaxes(title_text="epoch")
    curves.update_layout(height=320, margin={"l": 40, "r": 10, "t": 30, "b": 40})
    return confusion, curves


def _uris_shown(data: ReportData) -> set[str]:
    uri = data.rows.column("uri").to_pylist()
    shown = {uri[i] for row, ids, _ in data.strips for i in (row, *ids)}
    shown |= {uri[i] for group in data.groups[:MAX_GROUPS] for i in group}
    if data.errors is not None:
        shown |= set(data.errors.column("uri").to_pylist()[:MAX_ERRORS])
    if data.misclassified is not None:
        shown |= {r["uri"] for r in data.misclassified[:MAX_MISCLASSIFIED]}
    return shown


def _test_note(head: dict[str, Any]) -> str:
    """The head's test accuracy, when its table had test rows."""
    test = head.get("test")
    if not test:
        return ""
    return f"; test accuracy {test['accuracy']:.3f} on {test['rows']} test rows"


def _section(title: str, anchor: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>{body}</section>'


def render(data: ReportData, thumbs: dict[str, str | None] | None = None) -> str:
    """The page, as one HTML string."""
    import plotly.offline

    if thumbs is None:
        thumbs = thumbnails(_uris_shown(data))
    uri = data.rows.column("uri").to_pylist()
    label = data.rows.column("label").to_pylist()
    split = data.rows.column("split").to_pylist()
    parts = [
        f"<h1>Feature table report: {_e(data.features)}</h1>",
        '<p class="counts">'
        + "".join(
            f"<span>{name} <b>{_e(value if value is not None else 'n/a')}</b></span>"
            for name, value in data.counts.items()
        )
        + "</p>",
    ]
    recipe = "".join(
        f"<div><span>{_e(k)}</span> {_e(v)}</div>" for k, v in sorted(data.metadata.items())
    )
    parts.append(_section("Recipe", "recipe", f'<div class="kv">{recipe}</div>'))

    if data.errors is not None and data.errors.num_rows:
        rows = data.errors.to_pylist()
        body = "".join(
            f"<tr><td>{_figure(r['uri'], thumbs, '')}</td><td>{_e(r['uri'])}</td>"
            f"<td>{_e(r['stage'])}</td><td>{_e(r['reason'])}</td></tr>"
            for r in rows[:MAX_ERRORS]
        )
        more = (
            f'<p class="note">The first {MAX_ERRORS} of {len(rows)} errors.</p>'
            if len(rows) > MAX_ERRORS
            else ""
        )
        table_html = (
            '<table class="list"><tr><th></th><th>uri</th><th>stage</th><th>reason</th></tr>'
            f"{body}</table>{more}"
        )
    else:
        table_html = '<p class="note">No errors.</p>'
    parts.append(_section("Errors", "errors", table_html))

    parts.append(
        _section(
            "Labels and splits",
            "distribution",
            _plot(_distribution_figure(data), "distribution-chart"),
        )
    )
    sampled = (
        f"A random sample of {len(data.sample):,} of the {len(uri):,} rows (seeded)."
        if len(data.sample) < len(uri)
        else f"All {len(uri):,} rows."
    )
    parts.append(
        _section(
            "Map of the images",
            "map",
            f'<p class="note">{sampled} The first two principal components of the unit-length '
            "vectors; hover for the URI and label.</p>" + _plot(_map_figure(data), "map-chart"),
        )
    )

    strips = []
    for row, ids, sims in data.strips:
        cells = [
            _figure(uri[row], thumbs, f"{_e(_name(uri[row]))}<br>{_e(label[row])}", cls="query")
        ]
        cells += [
            _figure(uri[i], thumbs, f"{s:.3f} {_e(label[i])}<br>{_e(_name(uri[i]))}")
            for i, s in zip(ids, sims, strict=True)
        ]
        strips.append(f'<div class="strip">{"".join(cells)}</div>')
    source = (
        f"from {_e(data.neighbors_from)}" if data.neighbors_from else "exact search, computed here"
    )
    parts.append(
        _section(
            "Nearest neighbours",
            "neighbours",
            f'<p class="note">{len(data.strips)} random rows (outlined), each followed by its '
            f"nearest rows with their cosine similarity and label ({source}).</p>"
            + ("".join(strips) or '<p class="note">Not enough rows.</p>'),
        )
    )

    if data.neighbors_from:
        groups = []
        for n, group in enumerate(data.groups[:MAX_GROUPS]):
            cross = len({split[i] for i in group}) > 1
            tag = ' <span class="tag">crosses splits</span>' if cross else ""
            cells = "".join(
                _figure(uri[i], thumbs, f"{_e(split[i])} / {_e(label[i])}<br>{_e(_name(uri[i]))}")
                for i in group
            )
            groups.append(
                f'<div class="group{" cross" if cross else ""}"><b>group {n}</b> '
                f'({len(group)} rows){tag}<div class="strip">{cells}</div></div>'
            )
        crossing = sum(len({split[i] for i in g}) > 1 for g in data.groups)
        if data.duplicate_threshold is None:
            intro = "No duplicate search in this neighbours folder (run it with --duplicates)."
        else:
            intro = (
                f"{len(data.groups)} groups at cosine &ge; {data.duplicate_threshold}, "
                f"{crossing} crossing split boundaries (outlined in red)."
            )
            if len(data.groups) > MAX_GROUPS:
                intro += f" The first {MAX_GROUPS} groups, largest first."
        parts.append(
            _section(
                "Near-duplicates",
                "duplicates",
                f'<p class="note">{intro}</p>' + "".join(groups),
            )
        )

    if data.head is not None:
        confusion, curves = _head_figures(data.head)
        body = (
            f'<p class="note">{_e(data.head.get("head"))} head, validation accuracy '
            f"{data.head['accuracy']:.3f} ({_e(splits.describe(data.head.get('validation')))})"
            f"{_test_note(data.head)}.</p>" + _plot(confusion, "confusion-chart")
        )
        if data.head_mismatch:
            body = f'<p class="note warning">Warning: {_e(data.head_mismatch)}.</p>' + body
        body += (
            _plot(curves, "curves-chart")
            if curves is not None
            else '<p class="note">This head recorded no learning curves.</p>'
        )
        if data.misclassified is not None:
            wrong = data.misclassified[:MAX_MISCLASSIFIED]
            cells = "".join(
                _figure(
                    r["uri"],
                    thumbs,
                    f"true {_e(r['label'])}<br>predicted {_e(r['predicted'])} "
                    f"({r['probability']:.2f})<br>{_e(_name(r['uri']))}",
                )
                for r in wrong
            )
            total = len(data.misclassified)
            body += (
                f"<h3>Misclassified validation images ({total})</h3>"
                f'<p class="note">Most confident mistakes first'
                + (f"; the first {MAX_MISCLASSIFIED}" if total > len(wrong) else "")
                + f'.</p><div class="grid">{cells}</div>'
            )
        parts.append(_section("Classifier head", "head", body))

    script = plotly.offline.get_plotlyjs()
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>featurebeam report: {_e(data.features)}</title>"
        f"<style>{_CSS}</style><script>{script}</script></head>"
        f"<body>{''.join(parts)}"
        '<script type="application/json" id="report-data">'
        + json.dumps(page_facts(data)).replace("</", "<\\/")
        + "</script></body></html>"
    )


def page_facts(data: ReportData) -> dict[str, Any]:
    """Machine-readable figures embedded in the page (what the browser test checks)."""
    return {
        "rows": len(data.rows),
        "map_points": len(data.sample),
        "strips": len(data.strips),
        "groups": len(data.groups[:MAX_GROUPS]),
    }
