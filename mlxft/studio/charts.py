"""Charts drawn on the server as SVG: no chart library, nothing fetched, testable as text.

A chart is a list of series (label, steps, values) on shared axes; each <svg> says how many
logged points it shows (data-points), so a test or a reader can see it grow as a run trains.
A long series is thinned to MAX_DRAWN evenly spaced points (the last one always kept).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from markupsafe import Markup, escape

from mlxft.runs.summary import Metrics, PREFERENCE_KEYS

WIDTH, HEIGHT = 560, 260
LEFT, RIGHT, TOP, BOTTOM = 66, 14, 28, 38
MAX_DRAWN = 1200  # per series: more than the ~500 pixels of a plot can show
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#d62728")


@dataclass
class Series:
    label: str
    xs: list[float]
    ys: list[float]
    color: str | None = None
    dashed: bool = False
    markers: bool = False


@dataclass
class Chart:
    key: str  # stable id: the page swaps charts with the same key when new points arrive
    title: str
    ylabel: str
    series: list[Series] = field(default_factory=list)
    marks: list[tuple[float, str]] = field(default_factory=list)  # (step, label): resumes, alarms


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def _fmt(v: float, step: float) -> str:
    """A tick label with just enough digits that neighbouring ticks (`step` apart) read differently."""
    if v == 0:
        return "0"
    if step >= 1 and abs(v) < 1e6:
        return f"{v:.0f}"
    digits = max(1, math.ceil(math.log10(max(abs(v), step) / step)) + 1)
    return f"{v:.{digits}g}"


def render(chart: Chart) -> Markup:
    """The chart as an inline <svg> element (an empty-state message when it has no points yet)."""
    pts = [(x, y) for s in chart.series for x, y in zip(s.xs, s.ys) if _finite(y)]
    n_points = len(pts)
    head = (f'<svg class="chart" data-chart="{escape(chart.key)}" data-points="{n_points}" role="img" '
            f'aria-label="{escape(chart.title)}" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
            f'xmlns="http://www.w3.org/2000/svg">')
    parts = [head, f'<text x="{WIDTH / 2}" y="17" text-anchor="middle" class="title">{escape(chart.title)}</text>']
    if not pts:
        parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" class="empty">no points yet</text>')
        return Markup("".join(parts) + "</svg>")
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    if y0 >= 0 and y0 < 0.25 * y1:
        y0 = 0.0  # a quantity that starts near zero reads best from zero
    pad = (y1 - y0) * 0.05 or abs(y1) * 0.05 or 1.0
    y0, y1 = y0 - (pad if y0 else 0), y1 + pad
    x1 = x1 if x1 > x0 else x0 + 1
    pw, ph = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(x):
        return LEFT + (x - x0) / (x1 - x0) * pw

    def sy(y):
        return TOP + (1 - (y - y0) / (y1 - y0)) * ph

    yticks, xticks = _ticks(y0, y1), _ticks(x0, x1)
    for t in yticks:
        label = _fmt(t, _step(yticks))
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" class="grid"/>'
                     f'<text x="{LEFT - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{label}</text>')
    for t in xticks:
        parts.append(f'<text x="{sx(t):.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle">{_fmt(t, _step(xticks))}</text>')
    parts.append(f'<text x="{LEFT + pw / 2}" y="{HEIGHT - 6}" text-anchor="middle" class="axis">step</text>'
                 f'<text x="12" y="{TOP + ph / 2}" text-anchor="middle" class="axis" '
                 f'transform="rotate(-90 12 {TOP + ph / 2})">{escape(chart.ylabel)}</text>'
                 f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" class="frame"/>')
    for step, label in chart.marks:
        if x0 <= step <= x1:
            parts.append(f'<line x1="{sx(step):.1f}" x2="{sx(step):.1f}" y1="{TOP}" y2="{TOP + ph}" class="mark"/>'
                         f'<text x="{sx(step) + 3:.1f}" y="{TOP + ph - 5}" class="mark-label">{escape(label)}</text>')
    legend_x = LEFT + 8
    for i, s in enumerate(chart.series):
        color = s.color or COLORS[i % len(COLORS)]
        xy = _thin([(sx(x), sy(y)) for x, y in zip(s.xs, s.ys) if _finite(y)])
        if not xy:
            continue
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
        parts.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="1.6"{dash} '
                     f'data-series="{escape(s.label)}"/>')
        if s.markers or len(xy) == 1:
            parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.8" fill="{color}"/>' for x, y in xy]
        parts.append(f'<rect x="{legend_x}" y="{TOP + 6}" width="10" height="3" fill="{color}"/>'
                     f'<text x="{legend_x + 14}" y="{TOP + 11}" class="legend">{escape(s.label)}</text>')
        legend_x += 22 + 6.5 * len(s.label)
    return Markup("".join(parts) + "</svg>")


def _thin(xy: list) -> list:
    if len(xy) <= MAX_DRAWN:
        return xy
    stride = len(xy) / MAX_DRAWN
    return [xy[int(i * stride)] for i in range(MAX_DRAWN - 1)] + [xy[-1]]


def _step(ticks: list[float]) -> float:
    return ticks[1] - ticks[0] if len(ticks) > 1 else abs(ticks[0]) or 1.0


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def run_charts(metrics: Metrics) -> list[Chart]:
    """The curves of a run, as `mlxft report` draws them: loss, throughput, memory, LR, preference."""
    at: dict[int, list[str]] = {}  # an interrupt and its resume share a step: one line, both names
    for e in metrics.events:
        if e.get("event") in ("resumed", "interrupted", "overfitting", "early_stop", "diverged"):
            at.setdefault(e["step"], []).append(e["event"])
    marks = [(step, ", ".join(dict.fromkeys(names))) for step, names in sorted(at.items())]
    loss = Chart("loss", "Loss (train and validation)", "loss", marks=marks)
    loss.series.append(Series("train", *metrics.series("train_loss")))
    if metrics.val:
        loss.series.append(Series("validation", [m["step"] for m in metrics.val], [m["val_loss"] for m in metrics.val],
                                  markers=True))
    charts = [loss]
    if metrics.has("tokens_per_sec"):
        charts.append(Chart("throughput", "Tokens per second", "tokens / s",
                            [Series("all tokens", *metrics.series("tokens_per_sec"))], marks))
    if metrics.has("supervised_tokens_per_sec"):  # ~30x fewer than all tokens: its own chart, not a flat line
        charts.append(Chart("supervised", "Supervised tokens per second", "tokens / s",
                            [Series("supervised", *metrics.series("supervised_tokens_per_sec"), color=COLORS[2])]))
    if metrics.has("peak_memory_gb"):
        charts.append(Chart("memory", "Peak memory", "GB",
                            [Series("peak memory", *metrics.series("peak_memory_gb"), color=COLORS[3])]))
    if metrics.has("learning_rate"):
        charts.append(Chart("lr", "Learning rate", "learning rate",
                            [Series("learning rate", *metrics.series("learning_rate"), color=COLORS[4])]))
    if any(metrics.has(k) for k in PREFERENCE_KEYS):
        pref = Chart("preference", "Preference tuning", "margin / accuracy")
        for key in ("reward_margin", "preference_accuracy"):
            if metrics.has(key):
                pref.series.append(Series(f"{key.replace('_', ' ')} (train)", *metrics.series(key)))
            val = [(m["step"], m[f"val_{key}"]) for m in metrics.val if _finite(m.get(f"val_{key}"))]
            if val:
                pref.series.append(Series(f"{key.replace('_', ' ')} (validation)", [s for s, _ in val],
                                          [v for _, v in val], dashed=True, markers=True))
        charts.append(pref)
    if metrics.has("reward"):  # GRPO
        grpo = Chart("rewards", "GRPO rewards", "reward", [Series("reward (train)", *metrics.series("reward"))])
        val = [(m["step"], m["val_reward"]) for m in metrics.val if _finite(m.get("val_reward"))]
        if val:
            grpo.series.append(Series("reward (validation)", [s for s, _ in val], [v for _, v in val],
                                      dashed=True, markers=True))
        if metrics.has("kl"):
            grpo.series.append(Series("KL to the base", *metrics.series("kl"), color=COLORS[4]))
        charts.append(grpo)
    return charts


def overlay(key: str, title: str, ylabel: str, named: list[tuple[str, list, list]]) -> Chart:
    """One chart with a line per run (the compare page): named = [(label, steps, values)]."""
    return Chart(key, title, ylabel, [Series(label, xs, ys, dashed=i % 2 == 1) for i, (label, xs, ys) in enumerate(named)])


def bars(key: str, title: str, rows: list[tuple[str, int]]) -> Markup:
    """A vertical bar chart of (label, count): the token-length histogram of `mlxft data check`."""
    n = len(rows)
    pw, ph = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM - 14
    peak = max((c for _, c in rows), default=0) or 1
    bw = pw / max(n, 1)
    parts = [f'<svg class="chart" data-chart="{escape(key)}" data-points="{n}" role="img" aria-label="{escape(title)}" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" xmlns="http://www.w3.org/2000/svg">',
             f'<text x="{WIDTH / 2}" y="17" text-anchor="middle" class="title">{escape(title)}</text>']
    for i, (label, count) in enumerate(rows):
        h = ph * count / peak
        x = LEFT + i * bw
        parts.append(f'<rect x="{x + 3:.1f}" y="{TOP + ph - h:.1f}" width="{bw - 6:.1f}" height="{h:.1f}" '
                     f'fill="{COLORS[3] if "cut" in label else COLORS[0]}"/>'
                     f'<text x="{x + bw / 2:.1f}" y="{TOP + ph - h - 4:.1f}" text-anchor="middle">{count}</text>'
                     f'<text x="{x + bw / 2:.1f}" y="{TOP + ph + 14 + 12 * (i % 2)}" text-anchor="middle" '
                     f'class="small">{escape(label)}</text>')
    parts.append(f'<text x="{LEFT + pw / 2}" y="{HEIGHT - 4}" text-anchor="middle" class="axis">tokens per row</text>')
    return Markup("".join(parts) + "</svg>")
