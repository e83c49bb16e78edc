"""Inline SVG charts for the report, drawn in Python: no JavaScript, no CDN, they render offline.

Each function returns one ``<svg>`` element as a string (labels escaped), sized by its viewBox
so the page can scale it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape
from typing import NamedTuple

PASS = "#2e7d32"
PASS_K = "#1565c0"
BAR = "#6a1b9a"
AXIS = "#555"


class RateBar(NamedTuple):
    label: str
    rate: float | None  # 0..1
    low: float | None
    high: float | None
    pass_k: float | None


def _text(x: float, y: float, s: str, *, anchor: str = "start", size: int = 12, fill: str = AXIS) -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{fill}">'
            f"{escape(s)}</text>")


def pass_rates(bars: Sequence[RateBar], k: int, *, width: int = 760) -> str:
    """Horizontal bars: pass rate (with its Wilson interval as a whisker) and pass^k per scenario."""
    label_w, row_h, top = 250, 34, 28
    plot_w = width - label_w - 60
    height = top + row_h * max(len(bars), 1) + 30
    parts = [f'<svg class="chart" role="img" aria-label="pass rate and pass^{k} per scenario" '
             f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
             _text(label_w, 16, "pass rate (95% Wilson interval)", fill=PASS),
             _text(label_w + 230, 16, f"pass^{k}", fill=PASS_K)]
    for i, b in enumerate(bars):
        y = top + i * row_h
        parts.append(_text(label_w - 8, y + 15, b.label[:40], anchor="end"))
        if b.rate is None:
            parts.append(_text(label_w + 4, y + 15, "no judged trials"))
            continue
        parts.append(f'<rect class="bar" x="{label_w}" y="{y + 2}" width="{max(b.rate * plot_w, 1):.1f}" '
                     f'height="13" fill="{PASS}"><title>{escape(b.label)}: {b.rate:.0%}</title></rect>')
        if b.low is not None and b.high is not None:
            x0, x1, cy = label_w + b.low * plot_w, label_w + b.high * plot_w, y + 8.5
            parts.append(f'<line x1="{x0:.1f}" x2="{x1:.1f}" y1="{cy}" y2="{cy}" stroke="#000" stroke-width="1.5"/>')
            parts += [f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{cy - 5}" y2="{cy + 5}" stroke="#000"/>' for x in (x0, x1)]
        parts.append(_text(label_w + plot_w + 6, y + 14, f"{b.rate:.0%}"))
        if b.pass_k is not None:
            parts.append(f'<rect class="bar" x="{label_w}" y="{y + 18}" width="{max(b.pass_k * plot_w, 1):.1f}" '
                         f'height="9" fill="{PASS_K}"><title>pass^{k}: {b.pass_k:.2f}</title></rect>')
            parts.append(_text(label_w + plot_w + 6, y + 27, f"{b.pass_k:.2f}", size=10, fill=PASS_K))
    axis_y = top + row_h * max(len(bars), 1)
    parts.append(f'<line x1="{label_w}" x2="{label_w + plot_w}" y1="{axis_y}" y2="{axis_y}" stroke="{AXIS}"/>')
    for t in (0, 0.25, 0.5, 0.75, 1):
        parts.append(_text(label_w + t * plot_w, axis_y + 16, f"{t:.0%}", anchor="middle", size=10))
    parts.append("</svg>")
    return "".join(parts)


def histogram(values: Sequence[float], title: str, unit: str, *, bins: int = 12, integer: bool = False,
              width: int = 370, height: int = 220) -> str:
    """A histogram of ``values`` (an empty one says so)."""
    left, bottom, top = 40, 40, 26
    plot_w, plot_h = width - left - 12, height - top - bottom
    parts = [f'<svg class="chart" role="img" aria-label="{escape(title)}" viewBox="0 0 {width} {height}" '
             f'xmlns="http://www.w3.org/2000/svg">', _text(left, 16, title, size=13, fill="#000")]
    if not values:
        parts += [_text(width / 2, height / 2, "no data", anchor="middle"), "</svg>"]
        return "".join(parts)
    lo, hi = min(values), max(values)
    if integer:
        lo, hi = math.floor(lo), math.floor(hi) + 1
        bins = max(1, min(int(hi - lo), 30))
    elif hi == lo:
        hi = lo + 1e-9
    step = (hi - lo) / bins
    counts = [0] * bins
    for v in values:
        counts[min(int((v - lo) / step), bins - 1)] += 1
    peak = max(counts)
    bw = plot_w / bins
    for i, n in enumerate(counts):
        h = plot_h * n / peak
        x = left + i * bw
        parts.append(f'<rect class="bar" x="{x + 1:.1f}" y="{top + plot_h - h:.1f}" width="{max(bw - 2, 1):.1f}" '
                     f'height="{h:.1f}" fill="{BAR}"><title>{lo + i * step:.3g}-{lo + (i + 1) * step:.3g} '
                     f'{escape(unit)}: {n}</title></rect>')
    parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="{AXIS}"/>')
    parts.append(_text(left, top + plot_h + 14, f"{lo:.3g}", size=10))
    parts.append(_text(left + plot_w, top + plot_h + 14, f"{hi:.3g}", anchor="end", size=10))
    parts.append(_text(left + plot_w / 2, top + plot_h + 30, unit, anchor="middle", size=11))
    parts.append(_text(left - 4, top + 8, str(peak), anchor="end", size=10))
    parts.append("</svg>")
    return "".join(parts)
