"""Charts as inline SVG rendered on the server.

Colours and sizes are SVG presentation attributes (fill=, stroke=), never style=, so a strict
Content-Security-Policy holds. Every chart has a text alternative (role="img" + aria-label) and
the numbers are also shown as text next to it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from markupsafe import Markup, escape

from otabox.models import TASK_STATES, TaskState
from otabox.server.http.console.render import STATE_STYLE

BAR_WIDTH = 1000  # viewBox units; the SVG scales to its box
EMPTY = "#d0d7de"


def _fmt(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".")


def counts_text(counts: dict[TaskState, int]) -> str:
    parts = [f"{STATE_STYLE[s][1]} {counts[s]}" for s in TASK_STATES if counts.get(s)]
    return ", ".join(parts) if parts else "no devices"


def stacked_bar(counts: dict[TaskState, int], *, height: int = 24, label: str = "Task states") -> Markup:
    """One horizontal bar split by task state, in TASK_STATES order."""
    total = sum(counts.values())
    alt = f"{label}: {counts_text(counts)}"
    parts = [
        f'<svg class="bar" viewBox="0 0 {BAR_WIDTH} {height}" preserveAspectRatio="none" role="img"'
        f' aria-label="{escape(alt)}" height="{height}">',
        f'<rect x="0" y="0" width="{BAR_WIDTH}" height="{height}" fill="{EMPTY}"/>',
    ]
    x = 0.0
    for state in TASK_STATES:
        n = counts.get(state, 0)
        if not n or not total:
            continue
        w = BAR_WIDTH * n / total
        colour, name = STATE_STYLE[state]
        parts.append(
            f'<rect x="{_fmt(x)}" y="0" width="{_fmt(w)}" height="{height}" fill="{colour}">'
            f"<title>{escape(name)}: {n}</title></rect>"
        )
        x += w
    parts.append("</svg>")
    return Markup("".join(parts))


def cumulative(hist: Iterable[tuple[int, str, int]], buckets: int) -> tuple[list[int], list[int]]:
    """Histogram rows (bucket, status, n) -> cumulative succeeded and failed (failed + timeout) per bucket."""
    ok = [0] * buckets
    bad = [0] * buckets
    for b, status, n in hist:
        i = min(max(b, 0), buckets - 1)
        (ok if status == "succeeded" else bad)[i] += n
    for i in range(1, buckets):
        ok[i] += ok[i - 1]
        bad[i] += bad[i - 1]
    return ok, bad


def completion_curve(ok: Sequence[int], bad: Sequence[int], total: int, span_seconds: float) -> Markup:
    """Cumulative succeeded (and failed) devices over the job's running time."""
    w, h, left, bottom, top, right = 600, 180, 44, 24, 10, 10
    pw, ph = w - left - right, h - top - bottom
    ymax = max(total, ok[-1] if ok else 0, bad[-1] if bad else 0, 1)
    n = max(len(ok), 1)

    def pts(series: Sequence[int]) -> str:
        if not series:
            return ""
        coords = [f"{left},{top + ph}"]
        for i, v in enumerate(series):
            x = left + pw * (i + 1) / n
            coords.append(f"{_fmt(x)},{_fmt(top + ph - ph * v / ymax)}")
        return " ".join(coords)

    done_ok = ok[-1] if ok else 0
    done_bad = bad[-1] if bad else 0
    alt = f"Completion curve: {done_ok} of {total} succeeded, {done_bad} failure reports, over {int(span_seconds)} s"
    span = f"{int(span_seconds)} s" if span_seconds < 120 else f"{span_seconds / 60:.0f} min"
    svg = [
        f'<svg class="curve" viewBox="0 0 {w} {h}" role="img" aria-label="{escape(alt)}">',
        f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#57606a" stroke-width="1"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#57606a" stroke-width="1"/>',
        f'<line x1="{left}" y1="{top + ph - ph * total / ymax:.1f}" x2="{left + pw}"'
        f' y2="{top + ph - ph * total / ymax:.1f}" stroke="#8c959f" stroke-width="1" stroke-dasharray="4 4"/>',
        f'<text x="{left - 6}" y="{top + 4}" text-anchor="end" font-size="12" fill="#24292f">{ymax}</text>',
        f'<text x="{left - 6}" y="{top + ph}" text-anchor="end" font-size="12" fill="#24292f">0</text>',
        f'<text x="{left}" y="{h - 6}" font-size="12" fill="#24292f">start</text>',
        f'<text x="{left + pw}" y="{h - 6}" text-anchor="end" font-size="12" fill="#24292f">+{span}</text>',
    ]
    if ok:
        svg.append(
            f'<polyline points="{pts(ok)}" fill="none" stroke="{STATE_STYLE["succeeded"][0]}" stroke-width="2.5"/>'
        )
    if bad and bad[-1]:
        svg.append(f'<polyline points="{pts(bad)}" fill="none" stroke="{STATE_STYLE["failed"][0]}" stroke-width="2"/>')
    svg.append("</svg>")
    return Markup("".join(svg))
