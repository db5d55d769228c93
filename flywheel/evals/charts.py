"""Inline SVG charts for the eval report, drawn by hand: no JavaScript, no network, nothing to load.

Every piece of text that reaches the SVG goes through `esc` (intent names and problem types come
from logs and configs, and are untrusted). Long labels are shortened on the chart and kept whole in a
<title> tooltip.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape

from flywheel.evals.metrics import points

CHAMPION_COLOUR = "#9aa5b8"
CANDIDATE_COLOUR = "#2f6fdf"
BETTER_COLOUR = "#2e9e5b"
WORSE_COLOUR = "#d1495b"
MUTED_COLOUR = "#c9ced6"
SERIES_COLOURS = ("#2f6fdf", "#e07b24", "#2e9e5b", "#8e44ad", "#d1495b")
FONT = "font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif"
CHAR_W = 7.0  # rough width of one 12px character, for laying out labels
BOLD_FACTOR = 1.12  # bold text runs wider


def esc(text: object) -> str:
    return escape(str(text), quote=True)


def short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(limit - 1, 1)] + "\u2026"


def _label(text: str, x: float, y: float, limit: int, anchor: str = "end", extra: str = "") -> str:
    shown = short(text, limit)
    tooltip = f"<title>{esc(text)}</title>" if shown != text else ""
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" {extra}>{tooltip}{esc(shown)}</text>'


def _svg(width: float, height: float, body: list[str], title: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{esc(title)}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" height="{height:.0f}" '
        f'style="{FONT};font-size:12px;max-width:100%;height:auto">'
        f"<title>{esc(title)}</title>" + "".join(body) + "</svg>"
    )


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.floor(low / step) * step
    ticks = []
    value = start
    while value <= high + step * 1e-6:
        ticks.append(round(value, 10))
        value += step
    if ticks[-1] < high - 1e-12:
        ticks.append(round(value, 10))
    return ticks


def _legend(x: float, y: float, items: Sequence[tuple[str, str]]) -> list[str]:
    parts = []
    for name, colour in items:
        parts.append(f'<rect x="{x:.1f}" y="{y - 9:.1f}" width="12" height="12" rx="2" fill="{colour}"/>')
        parts.append(f'<text x="{x + 17:.1f}" y="{y + 1:.1f}">{esc(name)}</text>')
        x += 17 + CHAR_W * len(name) + 18
    return parts


# --- grouped bars: a rate per category, before and after ---------------------------------------------------


@dataclass
class BarPair:
    label: str
    before: float
    after: float
    before_ci: tuple[float, float] | None = None
    after_ci: tuple[float, float] | None = None
    emphasis: bool = False  # drawn in bold with a marker (targeted problem types)
    note: str = ""  # shown after the label, e.g. "targeted"


def grouped_bars(rows: Sequence[BarPair], title: str, legend: tuple[str, str] = ("champion", "candidate"), width: int = 760) -> str:
    """Horizontal grouped bars of two rates per row (0..1 axis) with 95% interval whiskers."""
    label_chars = min(max((len(r.label) + (len(r.note) + 3 if r.note else 0) for r in rows), default=10), 34)
    left = 16 + label_chars * CHAR_W * (BOLD_FACTOR if any(r.emphasis for r in rows) else 1.0)
    right = 70
    top, bar_h, gap, row_gap = 44, 13, 2, 14
    row_h = bar_h * 2 + gap + row_gap
    plot_w = width - left - right
    height = top + max(len(rows), 1) * row_h + 30
    top_value = max([0.05] + [v for r in rows for v in (r.before, r.after, *(r.before_ci or ()), *(r.after_ci or ()))])
    ticks = nice_ticks(0.0, min(1.0, top_value) if top_value <= 1 else top_value, 5)
    scale = plot_w / ticks[-1]
    body = [f'<text x="0" y="16" style="font-size:14px;font-weight:600">{esc(title)}</text>']
    body += _legend(left, 34, [(legend[0], CHAMPION_COLOUR), (legend[1], CANDIDATE_COLOUR)])
    axis_bottom = top + len(rows) * row_h
    for tick in ticks:
        x = left + tick * scale
        body.append(f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{axis_bottom:.1f}" stroke="#e6e9ee"/>')
        body.append(f'<text x="{x:.1f}" y="{axis_bottom + 16:.1f}" text-anchor="middle" fill="#667">{tick:.0%}</text>')
    if not rows:
        body.append(f'<text x="{left:.1f}" y="{top + 16}" fill="#667">nothing to show</text>')
    for index, row in enumerate(rows):
        y = top + index * row_h
        label = f"{row.label} ({row.note})" if row.note else row.label
        weight = 'font-weight="700"' if row.emphasis else ""
        body.append(_label(label, left - 8, y + bar_h + 5, label_chars, extra=weight))
        for offset, value, ci, colour in (
            (0, row.before, row.before_ci, CHAMPION_COLOUR),
            (bar_h + gap, row.after, row.after_ci, CANDIDATE_COLOUR),
        ):
            by = y + offset
            body.append(
                f'<rect x="{left:.1f}" y="{by:.1f}" width="{max(value * scale, 0.8):.1f}" height="{bar_h}" rx="2" fill="{colour}"/>'
            )
            if ci is not None:
                x1, x2, cy = left + ci[0] * scale, left + ci[1] * scale, by + bar_h / 2
                body.append(
                    f'<path d="M{x1:.1f} {cy:.1f}H{x2:.1f}M{x1:.1f} {cy - 3:.1f}v6M{x2:.1f} {cy - 3:.1f}v6" stroke="#334" stroke-width="1" fill="none" opacity="0.55"/>'
                )
            end = left + max(value, ci[1] if ci else value) * scale
            body.append(f'<text x="{end + 5:.1f}" y="{by + bar_h - 2:.1f}" fill="#334" style="font-size:11px">{value:.1%}</text>')
    body.append(f'<line x1="{left:.1f}" y1="{top - 4}" x2="{left:.1f}" y2="{axis_bottom:.1f}" stroke="#889"/>')
    return _svg(width, height, body, title)


# --- diverging bars: a signed change per category, sorted ---------------------------------------------------


@dataclass
class Change:
    label: str
    delta: float  # after - before, in the metric's own unit (a share)
    detail: str = ""  # tooltip text: "12/20 -> 15/20"
    muted: bool = False  # too few items to gate on: drawn grey


def diverging_bars(rows: Sequence[Change], title: str, width: int = 760, max_rows: int = 40) -> str:
    """Sorted horizontal bars around a zero line: green right (better), red left (worse).

    With more than `max_rows` rows only the most changed at each end are drawn, with a marked gap
    between them that says how many were left out."""
    by_delta = sorted(rows, key=lambda r: (r.delta, r.label))
    ordered: list[Change | None] = list(by_delta)
    hidden = 0
    if len(ordered) > max_rows:
        half = max_rows // 2
        hidden = len(ordered) - 2 * half
        ordered = ordered[:half] + [None] + ordered[-half:]  # None: the gap row
    drawn = [r for r in ordered if r is not None]
    label_chars = min(max((len(r.label) for r in drawn), default=10), 30)
    left = 20 + label_chars * CHAR_W
    value_room = 44  # space beyond the longest bar for its value label
    top, row_h = 34, 19
    plot_w = width - left - 12
    height = top + max(len(ordered), 1) * row_h + 40
    span = nice_ticks(0.0, max([0.05] + [abs(r.delta) for r in drawn]), 3)[-1]
    ticks = nice_ticks(0.0, span, 3)
    centre = left + plot_w / 2
    scale = (plot_w / 2 - value_room) / span
    body = [f'<text x="0" y="16" style="font-size:14px;font-weight:600">{esc(title)}</text>']
    axis_bottom = top + len(ordered) * row_h
    for tick in sorted({-t for t in ticks} | set(ticks)):
        x = centre + tick * scale
        body.append(f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{axis_bottom:.1f}" stroke="#e6e9ee"/>')
        body.append(
            f'<text x="{x:.1f}" y="{axis_bottom + 16:.1f}" text-anchor="middle" fill="#667">{f"{tick * 100:+.0f}" if abs(tick) > 1e-12 else "0"}</text>'
        )
    body.append(
        f'<text x="{centre:.1f}" y="{axis_bottom + 33:.1f}" text-anchor="middle" fill="#667">change in success, points (worse \u2190 \u2192 better)</text>'
    )
    if not ordered:
        body.append(f'<text x="{left:.1f}" y="{top + 14}" fill="#667">nothing to show</text>')
    for index, row in enumerate(ordered):
        y = top + index * row_h
        if row is None:
            body.append(
                f'<line x1="0" y1="{y + row_h / 2:.1f}" x2="{width}" y2="{y + row_h / 2:.1f}" stroke="#b0b6c0" stroke-dasharray="4 4"/>'
            )
            body.append(
                f'<text x="{width - 12}" y="{y + row_h - 5:.1f}" text-anchor="end" fill="#667" style="font-style:italic;paint-order:stroke;stroke:#fff;stroke-width:5px">'
                f"{hidden} smaller changes not drawn</text>"
            )
            continue
        flat = points(row.delta) == "+0.0"
        colour = MUTED_COLOUR if row.muted or flat else (BETTER_COLOUR if row.delta > 0 else WORSE_COLOUR)
        length = abs(row.delta) * scale
        x = centre if row.delta >= 0 else centre - length
        tip = f"<title>{esc(row.label)}: {points(row.delta)} points {esc(row.detail)}</title>"
        body.append(
            f'<rect x="{x:.1f}" y="{y + 3:.1f}" width="{max(length, 1.0):.1f}" height="{row_h - 6}" rx="2" fill="{colour}">{tip}</rect>'
        )
        body.append(_label(row.label, left - 8, y + row_h - 6, label_chars, extra='fill="#889"' if row.muted else ""))
        value_x = x + length + 5 if row.delta >= 0 else x - 5
        anchor = "start" if row.delta >= 0 else "end"
        body.append(
            f'<text x="{value_x:.1f}" y="{y + row_h - 6:.1f}" text-anchor="{anchor}" fill="#334" style="font-size:11px">{points(row.delta)}</text>'
        )
    body.append(f'<line x1="{centre:.1f}" y1="{top - 4}" x2="{centre:.1f}" y2="{axis_bottom:.1f}" stroke="#556"/>')
    return _svg(width, height, body, title)


# --- line chart: training curves ----------------------------------------------------------------------------


def line_chart(
    series: Mapping[str, Sequence[tuple[float, float]]],
    title: str,
    x_label: str = "step",
    y_label: str = "loss",
    width: int = 760,
    height: int = 300,
) -> str:
    """One polyline per series with round axes; a single point draws as a dot."""
    points = [p for values in series.values() for p in values]
    left, right, top, bottom = 58, 20, 44, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    body = [f'<text x="0" y="16" style="font-size:14px;font-weight:600">{esc(title)}</text>']
    if not points:
        body.append(f'<text x="{left}" y="{top + 20}" fill="#667">no training curve recorded</text>')
        return _svg(width, 90, body, title)
    body += _legend(left, 34, [(name, SERIES_COLOURS[i % len(SERIES_COLOURS)]) for i, name in enumerate(series)])
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_ticks = nice_ticks(min(xs), max(xs), 6)
    y_ticks = nice_ticks(min(0.0, min(ys)) if min(ys) < 0 else min(ys) * 0.9, max(ys), 5)
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return top + plot_h - (y - y0) / (y1 - y0) * plot_h

    for tick in y_ticks:
        body.append(f'<line x1="{left}" y1="{py(tick):.1f}" x2="{left + plot_w}" y2="{py(tick):.1f}" stroke="#e6e9ee"/>')
        body.append(f'<text x="{left - 6}" y="{py(tick) + 4:.1f}" text-anchor="end" fill="#667">{tick:g}</text>')
    for tick in x_ticks:
        body.append(f'<text x="{px(tick):.1f}" y="{top + plot_h + 16}" text-anchor="middle" fill="#667">{tick:g}</text>')
    body.append(f'<path d="M{left} {top}V{top + plot_h}H{left + plot_w}" stroke="#889" fill="none"/>')
    body.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 8}" text-anchor="middle" fill="#667">{esc(x_label)}</text>')
    body.append(
        f'<text transform="translate(14 {top + plot_h / 2:.1f}) rotate(-90)" text-anchor="middle" fill="#667">{esc(y_label)}</text>'
    )
    for index, (name, values) in enumerate(series.items()):
        colour = SERIES_COLOURS[index % len(SERIES_COLOURS)]
        ordered = sorted(values)
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in ordered)
        if len(ordered) > 1:
            body.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2" stroke-linejoin="round"/>')
        if len(ordered) <= 40:
            body += [
                f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{colour}"><title>{esc(name)} at {x:g}: {y:.4g}</title></circle>'
                for x, y in ordered
            ]
    return _svg(width, height, body, title)
