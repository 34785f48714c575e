"""Small hand-written SVG charts for the self-contained HTML report (no plotting dependency).

Every function returns one `<figure>`: an HTML caption (the title, which wraps instead of
being cut at the chart's edge) and one `<svg>` with text escaped and no external
references, so the report renders offline in any browser. Axes label their ends with as
many digits as the range needs (a range of 0.9996..1.0004 is not labelled "1" to "1").
"""

from __future__ import annotations

import math
from html import escape

PALETTE = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860")
_CHAR_W = 6.2  # approximate width of one 11px sans-serif character, for label margins


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def nice_ticks(lo: float, hi: float, n: int = 5) -> tuple[list[float], object]:
    """Round tick values (1, 2 or 5 x 10^k apart) inside [lo, hi], and a formatter with just
    enough decimals to tell them apart (a range of 0.9996..1.0004 is not labelled "1" to "1")."""
    span = hi - lo
    if not span > 0:
        return [lo], (lambda v: f"{v:.4g}")
    raw = span / max(1, n - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 5, 10)), key=lambda st: abs(math.log(st / raw)))
    k0, k1 = math.ceil(lo / step - 1e-6), math.floor(hi / step + 1e-6)
    ticks = [k * step for k in range(k0, k1 + 1)]
    decimals = max(0, -math.floor(math.log10(step) + 1e-12))
    if max(abs(lo), abs(hi)) >= 1e6:
        return ticks, (lambda v: f"{v:.3g}")
    return ticks, (lambda v: f"{v:,.{decimals}f}")


def _figure(title: str, body: list[str], width: float, height: float, note: str = "") -> str:
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="{escape(title)}">'
           + "".join(body) + "</svg>")
    cap = f"<figcaption>{escape(title)}" + (f' <span class="note">{escape(note)}</span>' if note else "") \
        + "</figcaption>"
    return f"<figure>{cap}{svg}</figure>"


def _legend(names: list[str], x: float, y: float, horizontal: bool = False, step: float = 16) -> list[str]:
    out = []
    for i, name in enumerate(names):
        xi, yi = (x + i * step, y) if horizontal else (x, y + i * step)
        out.append(f'<rect x="{xi:.0f}" y="{yi:.0f}" width="10" height="10" fill="{PALETTE[i % len(PALETTE)]}"/>'
                   f'<text x="{xi + 14:.0f}" y="{yi + 9:.0f}" font-size="11">{escape(name)}</text>')
    return out


def hbar_chart(title: str, labels: list[str], series: dict[str, list[float | None]], xmax: float = 1.0,
               width: int = 680, percent: bool = True) -> str:
    """Horizontal grouped bars: one group per label, one bar per series (values in [0, xmax])."""
    names = list(series)
    bar_h, gap, top = 12, 8, 22
    left = min(300, 12 + _CHAR_W * max((len(lab) for lab in labels), default=4))
    group_h = bar_h * len(names) + gap
    height = top + group_h * len(labels) + 10
    plot_w = width - left - 60
    val = (lambda v: f"{100 * v:.1f}%") if percent else _fmt
    out = _legend(names, left, 4, horizontal=True, step=120) if len(names) > 1 else []
    for g, label in enumerate(labels):
        y0 = top + g * group_h
        out.append(f'<text x="{left - 6:.0f}" y="{y0 + group_h / 2:.0f}" font-size="11" text-anchor="end">'
                   f'{escape(label)}</text>')
        for i, name in enumerate(names):
            v = series[name][g]
            y = y0 + i * bar_h
            if v is None:
                out.append(f'<text x="{left + 4:.0f}" y="{y + bar_h - 2}" font-size="10" fill="#888">n/a</text>')
                continue
            w = max(0.0, min(1.0, v / xmax)) * plot_w
            out.append(f'<rect x="{left:.0f}" y="{y}" width="{w:.1f}" height="{bar_h - 2}" '
                       f'fill="{PALETTE[i % len(PALETTE)]}"><title>{escape(name)}: {val(v)}</title></rect>'
                       f'<text x="{left + w + 4:.1f}" y="{y + bar_h - 3}" font-size="10">{val(v)}</text>')
    out.append(f'<line x1="{left:.0f}" y1="{top - 2}" x2="{left:.0f}" y2="{height - 8}" stroke="#333"/>')
    return _figure(title, out, width, height)


def reliability_diagram(title: str, curves: dict[str, list[dict]], size: int = 320) -> str:
    """Calibration curve: accuracy vs mean confidence per bin, with the diagonal; point area ~ count."""
    pad = 40
    inner = size - 2 * pad
    out = [f'<rect x="{pad}" y="{pad}" width="{inner}" height="{inner}" fill="none" stroke="#333"/>',
           f'<line x1="{pad}" y1="{pad + inner}" x2="{pad + inner}" y2="{pad}" stroke="#aaa" stroke-dasharray="4"/>',
           f'<text x="{pad + inner / 2}" y="{size - 8}" font-size="11" text-anchor="middle">'
           'confidence = exp(answer log-prob)</text>',
           f'<text x="12" y="{pad + inner / 2}" font-size="11" transform="rotate(-90 12 {pad + inner / 2})" '
           f'text-anchor="middle">accuracy</text>']
    for t in (0, 0.5, 1):
        out.append(f'<text x="{pad + t * inner}" y="{pad + inner + 14}" font-size="10" text-anchor="middle">{t}</text>'
                   f'<text x="{pad - 4}" y="{pad + (1 - t) * inner + 4}" font-size="10" text-anchor="end">{t}</text>')
    for i, (name, bins) in enumerate(curves.items()):
        color = PALETTE[i % len(PALETTE)]
        pts = [(b["confidence"], b["accuracy"], b["count"]) for b in bins if b["count"]]
        total = sum(c for _, _, c in pts) or 1
        path = " ".join(f"{pad + c * inner:.1f},{pad + (1 - a) * inner:.1f}" for c, a, _ in pts)
        if pts:
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}"/>')
        for c, a, n in pts:
            r = 2 + 8 * (n / total) ** 0.5
            out.append(f'<circle cx="{pad + c * inner:.1f}" cy="{pad + (1 - a) * inner:.1f}" r="{r:.1f}" '
                       f'fill="{color}" fill-opacity="0.6"><title>{escape(name)}: conf {_fmt(c)}, '
                       f'acc {_fmt(a)}, n={n}</title></circle>')
    out += _legend(list(curves), size + 4, pad)
    note = ("Each point is one confidence bin; its area is proportional to the number of answers in the bin "
            "(hover for n). The dashed diagonal is perfect calibration.")
    return _figure(title, out, size + 120, size, note)


def column_chart(title: str, labels: list[str], values: list[float], width: int = 680, height: int = 200,
                 log_y: bool = False, x_label: str = "", y_label: str = "") -> str:
    """Vertical bars (e.g. a histogram), optional log10(1 + v) height."""
    pad_l, pad_b, top = 50, 44, 14
    plot_w, plot_h = width - pad_l - 10, height - pad_b - top
    tr = (lambda v: math.log10(1 + v)) if log_y else (lambda v: v)
    vmax = max((tr(v) for v in values), default=0) or 1
    bw = plot_w / max(1, len(values))
    out = []
    for i, (lab, v) in enumerate(zip(labels, values)):
        h = tr(v) / vmax * plot_h
        x = pad_l + i * bw
        out.append(f'<rect x="{x + 1:.1f}" y="{top + plot_h - h:.1f}" width="{max(bw - 2, 0.5):.1f}" height="{h:.1f}" '
                   f'fill="{PALETTE[0]}"><title>{escape(lab)}: {v}</title></rect>'
                   f'<text x="{x + bw / 2:.1f}" y="{top + plot_h + 14}" font-size="9" text-anchor="middle">'
                   f'{escape(lab)}</text>'
                   f'<text x="{x + bw / 2:.1f}" y="{top + plot_h - h - 3:.1f}" font-size="9" '
                   f'text-anchor="middle">{v}</text>')
    out.append(f'<line x1="{pad_l}" y1="{top + plot_h}" x2="{width - 10}" y2="{top + plot_h}" stroke="#333"/>')
    if x_label:
        out.append(f'<text x="{pad_l + plot_w / 2:.0f}" y="{height - 6}" font-size="10" text-anchor="middle">'
                   f'{escape(x_label)}</text>')
    if y_label or log_y:
        text = (y_label + (" (log scale)" if log_y else "")).strip()
        out.append(f'<text x="12" y="{top + plot_h / 2:.0f}" font-size="10" text-anchor="middle" '
                   f'transform="rotate(-90 12 {top + plot_h / 2:.0f})">{escape(text)}</text>')
    return _figure(title, out, width, height)


def strip_plot(title: str, groups: dict[str, list[float]], width: int = 680, x_label: str = "",
               marker: tuple[float, str] | None = None) -> str:
    """One row of points per group on a shared x axis (signal distributions by kind), mean marked;
    `marker` = (x, label) draws a dashed vertical line (e.g. an abstention threshold)."""
    clean = {k: [v for v in vs if v is not None and not math.isnan(v)] for k, vs in groups.items()}
    allv = [v for vs in clean.values() for v in vs] + ([marker[0]] if marker else [])
    pad_l, top, row_h = 110, 8, 34
    height = top + row_h * len(clean) + 44
    plot_w = width - pad_l - 20
    lo, hi = (min(allv), max(allv)) if allv else (0.0, 1.0)
    note = ""
    if hi - lo <= 1e-9 * max(1.0, abs(hi)):
        note = f"(every value is {_fmt(lo)})"
        lo, hi = lo - 0.5, hi + 0.5
    sx = lambda v: pad_l + (v - lo) / (hi - lo) * plot_w  # noqa: E731
    out = []
    for i, (name, vs) in enumerate(clean.items()):
        y = top + row_h * i + row_h / 2
        color = PALETTE[i % len(PALETTE)]
        out.append(f'<text x="{pad_l - 6}" y="{y + 4}" font-size="11" text-anchor="end">{escape(name)} '
                   f'({len(vs)})</text>')
        for j, v in enumerate(vs):
            jitter = ((j * 7919) % 17 - 8) * 0.9  # deterministic spread so equal values stay visible
            out.append(f'<circle cx="{sx(v):.1f}" cy="{y + jitter:.1f}" r="2.5" fill="{color}" fill-opacity="0.5"/>')
        if vs:
            m = sum(vs) / len(vs)
            out.append(f'<line x1="{sx(m):.1f}" y1="{y - 12}" x2="{sx(m):.1f}" y2="{y + 12}" stroke="#000" '
                       f'stroke-width="2"><title>mean {_fmt(m)}</title></line>')
    yb = top + row_h * len(clean) + 4
    if marker is not None:
        out.append(f'<line x1="{sx(marker[0]):.1f}" y1="{top}" x2="{sx(marker[0]):.1f}" y2="{yb}" stroke="#C44E52" '
                   f'stroke-dasharray="4 3"/><text x="{sx(marker[0]) + 4:.1f}" y="{top + 8}" font-size="10" '
                   f'fill="#C44E52">{escape(marker[1])}</text>')
    out += _x_axis(lo, hi, sx, yb, pad_l, plot_w, x_label or "value (black bar: mean)")
    return _figure(title, out, width, height, note)


def _x_axis(lo, hi, sx, yb, pad_l, plot_w, label: str) -> list[str]:
    ticks, fmt = nice_ticks(lo, hi)
    out = [f'<line x1="{pad_l}" y1="{yb}" x2="{pad_l + plot_w}" y2="{yb}" stroke="#333"/>']
    for v in ticks:
        anchor = "middle"
        out.append(f'<line x1="{sx(v):.1f}" y1="{yb}" x2="{sx(v):.1f}" y2="{yb + 4}" stroke="#333"/>'
                   f'<text x="{sx(v):.1f}" y="{yb + 15}" font-size="10" text-anchor="{anchor}">{fmt(v)}</text>')
    out.append(f'<text x="{pad_l + plot_w / 2:.0f}" y="{yb + 30}" font-size="10" text-anchor="middle">'
               f'{escape(label)}</text>')
    return out


def line_chart(title: str, xs: list[float], series: dict[str, list[float | None]], width: int = 680,
               height: int = 220, x_label: str = "step", y_label: str = "", note: str = "",
               widths: dict[str, float] | None = None) -> str:
    """Lines over a shared x axis (training curves); None values leave a gap."""
    pad_l, pad_r, top, pad_b = 56, 12, 10, 44
    plot_w, plot_h = width - pad_l - pad_r, height - top - pad_b
    ys = [v for vs in series.values() for v in vs if v is not None and math.isfinite(v)]
    if not xs or not ys:
        return _figure(title, ['<text x="10" y="20" font-size="11">no data</text>'], width, 40, note)
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 - y0 <= 1e-12 * max(1.0, abs(y1)):
        y0, y1 = y0 - 0.5, y1 + 0.5
    sx = lambda v: pad_l + (v - x0) / (x1 - x0) * plot_w  # noqa: E731
    sy = lambda v: top + (1 - (v - y0) / (y1 - y0)) * plot_h  # noqa: E731
    out = []
    ticks, fmt = nice_ticks(y0, y1)
    for v in ticks:
        out.append(f'<line x1="{pad_l}" y1="{sy(v):.1f}" x2="{pad_l + plot_w}" y2="{sy(v):.1f}" stroke="#eee"/>'
                   f'<text x="{pad_l - 4}" y="{sy(v) + 3:.1f}" font-size="10" text-anchor="end">{fmt(v)}</text>')
    for i, (name, vs) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        w = (widths or {}).get(name, 1.5)
        segs, cur = [], []
        for x, v in zip(xs, vs):
            if v is None or not math.isfinite(v):
                if cur:
                    segs.append(cur)
                cur = []
            else:
                cur.append(f"{sx(x):.1f},{sy(v):.1f}")
        if cur:
            segs.append(cur)
        for seg in segs:
            out.append(f'<polyline points="{" ".join(seg)}" fill="none" stroke="{color}" stroke-width="{w}"/>')
    if y_label:
        out.append(f'<text x="12" y="{top + plot_h / 2:.0f}" font-size="10" text-anchor="middle" '
                   f'transform="rotate(-90 12 {top + plot_h / 2:.0f})">{escape(y_label)}</text>')
    out += _x_axis(x0, x1, sx, top + plot_h, pad_l, plot_w, x_label)
    if len(series) > 1:
        out += _legend(list(series), pad_l + 8, top + 4, horizontal=True, step=170)
    return _figure(title, out, width, height, note)
