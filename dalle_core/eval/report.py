"""The evaluation report: one self-contained HTML page (every image inlined as PNG).

Sections: the metric table (with a 'not computed: reason' row for each missing
metric), FD/FID against blur radius (paper Figure 9), sample grids beside the
reference image of their caption, a comparison with earlier model versions, and
the settings that pin the numbers (implementation, resize, compression, counts):
FID is only comparable between reports whose settings agree.
"""

from __future__ import annotations

import base64
import html
import io
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from PIL import Image

from dalle_core.imaging import image_grid, png_bytes

_BLUR_KEY = re.compile(r"^(?P<base>[a-z_]+?)(?:_blur(?P<r>[0-9.]+))?$")
PLOTTED = (("contrastive_fd", "contrastive FD"), ("fid", "FID"))


@dataclass
class Report:
    html: str
    plot_png: Optional[bytes]  # FD/FID vs blur radius, for the caller's metadata; None without data


def numeric_metrics(metrics: Mapping) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def blur_curve(metrics: Mapping, base: str) -> list[tuple[float, float]]:
    """[(radius, value)] of `base` and its `_blur<r>` variants, by radius."""
    pts = []
    for k, v in numeric_metrics(metrics).items():
        m = _BLUR_KEY.match(k)
        if m and m["base"] == base:
            pts.append((float(m["r"] or 0), v))
    return sorted(pts)


def blur_plot_png(metrics: Mapping) -> Optional[bytes]:
    curves = [(label, blur_curve(metrics, base)) for base, label in PLOTTED]
    curves = [(label, pts) for label, pts in curves if pts]
    if not curves:
        return None
    import matplotlib
    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    axes = [ax, ax.twinx()] if len(curves) == 2 else [ax]  # FD and FID have unrelated scales
    for a, (label, pts), color in zip(axes, curves, ("tab:blue", "tab:orange")):
        a.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=label)
        a.set_ylabel(label, color=color)
    ax.set_xlabel("Gaussian blur radius (px, both image sets)")
    ax.set_title("Frechet distance vs blur radius")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) else html.escape(str(v))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def render_report(metrics: Mapping, *, title: str = "Zero-shot evaluation",
                  samples: Sequence[Mapping] = (), history: Sequence[Mapping] = (),
                  settings: Optional[Mapping[str, str]] = None, version: str = "this run",
                  descriptions: Optional[Mapping[str, str]] = None,
                  comparison: Optional[Mapping] = None, caption_match: Optional[Mapping] = None) -> Report:
    """`metrics`: the dict of `zero_shot_metrics` (numbers, 'not_computed', 'settings').
    `samples`: [{'caption', 'generated': [PIL], 'reference': PIL or None}].
    `history`: earlier versions, [{'version', 'metrics'}]. `settings`: extra settings rows.
    `descriptions`: {metric: what it measures}. `comparison`: {'title', 'header', 'rows',
    'note'}: the challenger and champion side by side, measured under one fingerprint.
    `caption_match`: {'title', 'header', 'rows', 'note', 'descriptions'}: the caption-match
    figures (first draw, any-of-N, reranked, per attribute) per caption set, and the diagnosis."""
    values = numeric_metrics(metrics)
    missing = dict(metrics.get("not_computed", {}))
    desc = dict(descriptions or {})
    rows = [[html.escape(k), _fmt(v), html.escape(desc.get(k, ""))] for k, v in values.items()]
    rows += [[html.escape(k), f'<span class="nc">not computed: {html.escape(r)}</span>', html.escape(desc.get(k, ""))]
             for k, r in missing.items()]
    parts = [f"<h1>{html.escape(title)}</h1>", "<h2>Metrics</h2>", _table(["metric", "value", "what it measures"], rows)]
    if comparison:
        parts += [f"<h2>{html.escape(str(comparison.get('title', 'Challenger vs champion')))}</h2>",
                  _table(list(comparison["header"]), [[html.escape(str(c)) for c in r] for r in comparison["rows"]]),
                  f"<p>{html.escape(str(comparison.get('note', '')))}</p>"]
    if caption_match:
        cdesc = dict(caption_match.get("descriptions", {}))
        parts += [f"<h2>{html.escape(str(caption_match.get('title', 'Caption match')))}</h2>",
                  _table([*caption_match["header"], "what it measures"],
                         [[html.escape(str(c)) for c in r] + [html.escape(cdesc.get(str(r[0]), ""))]
                          for r in caption_match["rows"]])]
        if caption_match.get("note"):
            parts.append(f"<p><b>Diagnosis</b>: {html.escape(str(caption_match['note']))}</p>")

    plot = blur_plot_png(metrics)
    parts.append("<h2>Frechet distance vs blur radius</h2>")
    parts.append(_img(plot, "FD vs blur radius") if plot else "<p>no blur curve computed</p>")
    if "fid" in missing:
        parts.append(f'<p class="nc">FID not computed: {html.escape(missing["fid"])}</p>')

    if samples:
        srows = []
        for s in samples:
            gen = _img(png_bytes(image_grid(list(s["generated"]), ncols=8, cell=96)), "generated")
            ref = _img(png_bytes(s["reference"].convert("RGB")), "reference") if s.get("reference") else ""
            srows.append([html.escape(str(s.get("caption", ""))), gen, ref])
        parts += ["<h2>Samples</h2>", _table(["caption", "generated", "reference"], srows)]

    if history:
        runs = [*history, {"version": version, "metrics": metrics}]
        names = list(values) + [k for h in history for k in numeric_metrics(h.get("metrics", {}))
                                if k not in values]
        names = list(dict.fromkeys(names))
        hrows = [[html.escape(str(h.get("version", "?")))]
                 + [_fmt(numeric_metrics(h.get("metrics", {})).get(n, "-")) for n in names] for h in runs]
        parts += ["<h2>Earlier versions</h2>", _table(["version", *names], hrows)]

    all_settings = {**dict(metrics.get("settings", {})), **dict(settings or {})}
    parts += ["<h2>Settings</h2>", _table(["setting", "value"],
                                          [[html.escape(k), html.escape(str(v))] for k, v in all_settings.items()])]
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}.nc{color:#a00}")
    page = (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    return Report(html=page, plot_png=plot)
