"""Small hand-written SVG charts for the self-contained HTML report (no plotting dependency).

Every function returns one `<svg>` element as a string, with text escaped and
no external references, so the report renders offline in any browser.
"""

from __future__ import annotations

from html import escape

PALETTE = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860")


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def hbar_chart(title: str, labels: list[str], series: dict[str, list[float | None]], xmax: float = 1.0,
               width: int = 640) -> str:
    """Horizontal grouped bars: one group per label, one bar per series (values in [0, xmax])."""
    names = list(series)
    bar_h, gap, left, top = 12, 8, 190, 34
    group_h = bar_h * len(names) + gap
    height = top + group_h * len(labels) + 30
    plot_w = width - left - 60
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="{escape(title)}">',
           f'<text x="10" y="18" font-size="14" font-weight="bold">{escape(title)}</text>']
    for i, name in enumerate(names):
        x = left + i * 140
        out.append(f'<rect x="{x}" y="24" width="10" height="10" fill="{PALETTE[i % len(PALETTE)]}"/>'
                   f'<text x="{x + 14}" y="33" font-size="11">{escape(name)}</text>')
    for g, label in enumerate(labels):
        y0 = top + 8 + g * group_h
        out.append(f'<text x="{left - 6}" y="{y0 + group_h / 2}" font-size="11" text-anchor="end">'
                   f'{escape(label)}</text>')
        for i, name in enumerate(names):
            v = series[name][g]
            y = y0 + i * bar_h
            if v is None:
                out.append(f'<text x="{left + 4}" y="{y + bar_h - 2}" font-size="10" fill="#888">n/a</text>')
                continue
            w = max(0.0, min(1.0, v / xmax)) * plot_w
            out.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h - 2}" '
                       f'fill="{PALETTE[i % len(PALETTE)]}"><title>{escape(name)}: {_fmt(v)}</title></rect>'
                       f'<text x="{left + w + 4:.1f}" y="{y + bar_h - 3}" font-size="10">{_fmt(v)}</text>')
    out.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - 24}" stroke="#333"/>')
    out.append("</svg>")
    return "".join(out)


def reliability_diagram(title: str, curves: dict[str, list[dict]], size: int = 320) -> str:
    """Calibration curve: accuracy vs mean confidence per bin, with the diagonal; point area ~ count."""
    pad = 40
    inner = size - 2 * pad
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size + 120}" height="{size}" role="img" '
           f'aria-label="{escape(title)}">',
           f'<text x="10" y="18" font-size="14" font-weight="bold">{escape(title)}</text>',
           f'<rect x="{pad}" y="{pad}" width="{inner}" height="{inner}" fill="none" stroke="#333"/>',
           f'<line x1="{pad}" y1="{pad + inner}" x2="{pad + inner}" y2="{pad}" stroke="#aaa" stroke-dasharray="4"/>',
           f'<text x="{pad + inner / 2}" y="{size - 8}" font-size="11" text-anchor="middle">confidence</text>',
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
        out.append(f'<rect x="{size}" y="{pad + i * 16}" width="10" height="10" fill="{color}"/>'
                   f'<text x="{size + 14}" y="{pad + i * 16 + 9}" font-size="11">{escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def column_chart(title: str, labels: list[str], values: list[float], width: int = 640, height: int = 220,
                 log_y: bool = False) -> str:
    """Vertical bars (e.g. a histogram), optional log10(1 + v) height."""
    import math

    pad_l, pad_b, top = 50, 40, 30
    plot_w, plot_h = width - pad_l - 10, height - pad_b - top
    tr = (lambda v: math.log10(1 + v)) if log_y else (lambda v: v)
    vmax = max((tr(v) for v in values), default=0) or 1
    bw = plot_w / max(1, len(values))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="{escape(title)}">',
           f'<text x="10" y="18" font-size="14" font-weight="bold">{escape(title)}</text>']
    for i, (lab, v) in enumerate(zip(labels, values)):
        h = tr(v) / vmax * plot_h
        x = pad_l + i * bw
        out.append(f'<rect x="{x + 1:.1f}" y="{top + plot_h - h:.1f}" width="{bw - 2:.1f}" height="{h:.1f}" '
                   f'fill="{PALETTE[0]}"><title>{escape(lab)}: {v}</title></rect>'
                   f'<text x="{x + bw / 2:.1f}" y="{top + plot_h + 14}" font-size="9" text-anchor="middle">'
                   f'{escape(lab)}</text>'
                   f'<text x="{x + bw / 2:.1f}" y="{top + plot_h - h - 3:.1f}" font-size="9" '
                   f'text-anchor="middle">{v}</text>')
    out.append(f'<line x1="{pad_l}" y1="{top + plot_h}" x2="{width - 10}" y2="{top + plot_h}" stroke="#333"/>')
    if log_y:
        out.append(f'<text x="{pad_l}" y="{height - 6}" font-size="10">(bar height: log scale)</text>')
    out.append("</svg>")
    return "".join(out)


def strip_plot(title: str, groups: dict[str, list[float]], width: int = 640) -> str:
    """One row of points per group on a shared x axis (signal distributions by kind), mean marked."""
    import math

    clean = {k: [v for v in vs if v is not None and not math.isnan(v)] for k, vs in groups.items()}
    allv = [v for vs in clean.values() for v in vs]
    pad_l, top, row_h = 90, 30, 34
    height = top + row_h * len(clean) + 30
    plot_w = width - pad_l - 20
    lo, hi = (min(allv), max(allv)) if allv else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    sx = lambda v: pad_l + (v - lo) / (hi - lo) * plot_w  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="{escape(title)}">',
           f'<text x="10" y="18" font-size="14" font-weight="bold">{escape(title)}</text>']
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
    out.append(f'<line x1="{pad_l}" y1="{yb}" x2="{pad_l + plot_w}" y2="{yb}" stroke="#333"/>'
               f'<text x="{pad_l}" y="{yb + 14}" font-size="10">{_fmt(lo)}</text>'
               f'<text x="{pad_l + plot_w}" y="{yb + 14}" font-size="10" text-anchor="end">{_fmt(hi)}</text>')
    out.append("</svg>")
    return "".join(out)
