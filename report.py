"""report.html: one static page per evaluation, beside its summary.json, that any browser opens
offline. Headline scores with their intervals, what was scored, a histogram of per-image IoU,
the review curve, the threshold curve where one was measured, and every image as a small
thumbnail with its true and predicted outlines, worst first.

Nothing in the page points outside its folder: the charts are inline SVG, the thumbnails are
JPEG files in thumbnails/ beside it, and a few lines of inline JavaScript re-sort them.
"""
import csv
import html
import json
from dataclasses import dataclass
from urllib.parse import quote

import cv2
import numpy as np
from PIL import Image

import metrics
import preprocess

THUMB_SIDE = 256            # longest side of a thumbnail, px
THUMB_QUALITY = 80          # JPEG quality of the thumbnails
TRUE_COLOUR = (0, 255, 255)   # cyan: the true outline, as in test_model.py's overlay figure
PRED_COLOUR = (255, 255, 0)   # yellow: the predicted outline
HISTOGRAM_BINS = 20         # bins of the per-image IoU histogram over [0, 1]


# ----------------------------------------------------------------------------- thumbnails

def thumbnail(image_path, truth, pred, path, exif=True, side=THUMB_SIDE):
    """The image shrunk to at most `side` px with the true (cyan) and predicted (yellow)
    outlines drawn on it, saved as a JPEG. truth and pred: bool masks at the image's size."""
    h, w = truth.shape
    scale = min(1.0, side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    image = preprocess.read_image(image_path, min_hw=(side, side), exif=exif)
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    for mask, colour in ((truth, TRUE_COLOUR), (pred, PRED_COLOUR)):
        # shrunk as an area share, so a thin lesion keeps an outline where it covers half a pixel
        shrunk = cv2.resize(mask.astype(np.float32), size, interpolation=cv2.INTER_AREA) >= 0.5
        contours, _ = cv2.findContours(shrunk.astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(small, contours, -1, colour, 1)
    with preprocess.atomic_write(path) as tmp:
        Image.fromarray(small).save(tmp, format="JPEG", quality=THUMB_QUALITY)
    return path


# ----------------------------------------------------------------------------- charts (SVG)

W, H, PAD, LEFT = 420, 240, 40, 56  # chart size, margin and left margin (tick labels), px


def _x(v, lo, hi):
    return LEFT + (v - lo) / (hi - lo) * (W - LEFT - PAD)


def _y(v, lo, hi):
    return H - PAD - (v - lo) / (hi - lo) * (H - 2 * PAD)


def _axes(xlabel, ylabel, xticks, yticks, xlim, ylim):
    parts = [f'<line x1="{LEFT}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="#333"/>',
             f'<line x1="{LEFT}" y1="{PAD}" x2="{LEFT}" y2="{H - PAD}" stroke="#333"/>']
    for t in xticks:
        x = _x(t, *xlim)
        parts.append(f'<text x="{x:.1f}" y="{H - PAD + 14}" font-size="10" '
                     f'text-anchor="middle">{t:g}</text>')
    for t in yticks:
        y = _y(t, *ylim)
        parts.append(f'<text x="{LEFT - 4}" y="{y + 3:.1f}" font-size="10" '
                     f'text-anchor="end">{t:g}</text>')
        parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{W - PAD}" y2="{y:.1f}" '
                     f'stroke="#ddd"/>')
    parts.append(f'<text x="{(LEFT + W - PAD) / 2}" y="{H - 6}" font-size="11" '
                 f'text-anchor="middle">'
                 f'{html.escape(xlabel)}</text>')
    parts.append(f'<text x="12" y="{H / 2}" font-size="11" text-anchor="middle" '
                 f'transform="rotate(-90 12 {H / 2})">{html.escape(ylabel)}</text>')
    return parts


def _svg(parts, label):
    return (f'<svg width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" '
            f'aria-label="{html.escape(label)}">' + "".join(parts) + "</svg>")


def iou_histogram_svg(iou):
    counts, edges = np.histogram(np.asarray(iou, float), bins=HISTOGRAM_BINS, range=(0, 1))
    top = max(1, int(counts.max(initial=0)))
    step = max(1, int(np.ceil(top / 5)))
    parts = _axes("per-image IoU", "images", np.linspace(0, 1, 6).round(1),
                  range(0, top + 1, step), (0, 1), (0, top))
    for c, lo, hi in zip(counts, edges[:-1], edges[1:]):
        x0, x1, y = _x(lo, 0, 1), _x(hi, 0, 1), _y(c, 0, top)
        colour = "#c0392b" if hi <= metrics.JACCARD_THRESHOLD + 1e-9 else "#2e86c1"
        parts.append(f'<rect x="{x0 + 0.5:.1f}" y="{y:.1f}" width="{x1 - x0 - 1:.1f}" '
                     f'height="{H - PAD - y:.1f}" fill="{colour}"/>')
    x = _x(metrics.JACCARD_THRESHOLD, 0, 1)
    parts.append(f'<line x1="{x:.1f}" y1="{PAD - 10}" x2="{x:.1f}" y2="{H - PAD}" '
                 f'stroke="#000" stroke-dasharray="4 3"/>')
    parts.append(f'<text x="{x + 3:.1f}" y="{PAD - 12}" font-size="10">'
                 f'{metrics.JACCARD_THRESHOLD:g}: failed below</text>')
    return _svg(parts, "histogram of per-image IoU")


def lines_svg(series, xs, xlabel, ylabel, xlim, label, xticks=None):
    """Line chart: series = [(name, colour, [y per x])]; y axis fitted to the values. Each
    line is thinner and dashed over the one before, so that lines that coincide (thresholded
    Jaccard equals IoU where no image fails) stay visible."""
    values = [v for _, _, ys in series for v in ys if v == v]
    lo = max(0.0, np.floor(min(values, default=0) * 20) / 20)
    hi = min(1.0, np.ceil(max(values, default=1) * 20) / 20)
    hi = hi if hi > lo else lo + 0.05
    yticks = np.round(np.linspace(lo, hi, 5), 3)
    xticks = np.round(np.linspace(*xlim, 6), 2) if xticks is None else xticks
    parts = _axes(xlabel, ylabel, xticks, yticks, xlim, (lo, hi))
    for i, (name, colour, ys) in enumerate(series):
        points = " ".join(f"{_x(x, *xlim):.1f},{_y(y, lo, hi):.1f}"
                          for x, y in zip(xs, ys) if y == y)
        dash = f' stroke-dasharray="{6 - i} 3"' if i else ""
        parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" '
                     f'stroke-width="{max(1.2, 3.5 - 1.2 * i)}"{dash}/>')
        parts += [f'<circle cx="{_x(x, *xlim):.1f}" cy="{_y(y, lo, hi):.1f}" r="2.5" '
                  f'fill="{colour}"/>' for x, y in zip(xs, ys) if y == y]
        # the legend sits in the top margin, clear of every line
        parts.append(f'<text x="{LEFT + 4}" y="{11 + 12 * i}" font-size="11" '
                     f'fill="{colour}">{html.escape(name)}</text>')
    return _svg(parts, label)


def review_svg(curve):
    xs = [100 * r["set_aside"] for r in curve]
    return lines_svg([("mean IoU of the rest", "#2e86c1", [r["iou"] for r in curve]),
                      ("thresholded Jaccard of the rest", "#c0392b",
                       [r["threshold_jaccard"] for r in curve])],
                     xs, "least confident images set aside (%)", "score",
                     (0, max(xs) if xs and max(xs) > 0 else 1), "review curve", xs)


def threshold_svg(curve):
    xs = [float(r["threshold"]) for r in curve]
    return lines_svg([(name, colour, [float(r[key]) for r in curve]) for key, name, colour in
                      (("iou", "mean IoU", "#2e86c1"), ("dice", "mean Dice", "#27ae60"),
                       ("threshold_jaccard", "thresholded Jaccard", "#c0392b"))],
                     xs, "threshold", "score", (0, 1), "score against threshold")


# ----------------------------------------------------------------------------- the page

STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: left; font-size: 14px; }
.charts { display: flex; flex-wrap: wrap; gap: 1.5em; }
#grid { display: flex; flex-wrap: wrap; gap: 8px; }
.item { margin: 0; width: 260px; font-size: 12px; }
.item img { display: block; max-width: 256px; max-height: 256px; }
.item.failed figcaption b { color: #c0392b; }
.low { background: #fdebd0; }
button { margin-right: 0.5em; }
"""

SORT_SCRIPT = """
function sortBy(key, descending) {
  const grid = document.getElementById('grid');
  const items = Array.from(grid.children);
  items.sort(function (a, b) {
    const x = a.dataset[key], y = b.dataset[key];
    const d = key === 'name' ? x.localeCompare(y) : parseFloat(x) - parseFloat(y);
    return descending ? -d : d;
  });
  items.forEach(function (item) { grid.appendChild(item); });
}
"""


def _fmt(value, digits=3):
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else html.escape(str(value))


def _table(rows, header=None):
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in row) + "</tr>")
    return "".join(out + ["</table>"])


def headline_rows(summary):
    """[(score, mean, 95% interval, better, what it is)] of every metric of the registry, from
    a summary with each mean under its name and the intervals under "intervals"."""
    rows = []
    for metric in metrics.REGISTRY:
        if metric.name not in summary:
            continue
        block = summary.get("intervals", {}).get(metric.name)
        interval = f"{block['low']:.3f} to {block['high']:.3f}" if block else ""
        rows.append((metric.name, summary[metric.name], interval,
                     "higher" if metric.higher_is_better else "lower", metric.about))
    return rows


@dataclass
class Judgement:
    """What the page shows beside the scores: review: metrics.review_curve rows; failure:
    metrics.failure_auroc_interval of the confidence; threshold_curves: [(label, rows of
    threshold_curve.csv)]; level: the calibrated confidence level, if any."""
    review: list = None
    failure: dict = None
    threshold_curves: tuple = ()
    level: float = None


def write_report(path, title, facts, headline, items, judged=None):
    """Write the page.

    facts: [(label, value)] (checkpoints, recipe, split...); headline: [(score, mean, interval
    text)]; items: [{"id", "iou", "threshold_jaccard", "confidence", "thumbnail"}] with the
    thumbnail's path relative to the page; judged: a Judgement."""
    judged = judged or Judgement()
    review, failure, level = judged.review, judged.failure, judged.level
    threshold_curves = judged.threshold_curves
    items = sorted(items, key=lambda r: (r["iou"], r["id"]))  # worst first
    iou = [r["iou"] for r in items]
    body = [f"<h1>{html.escape(title)}</h1>",
            _table([(k, v if isinstance(v, str) else json.dumps(v)) for k, v in facts]),
            "<h2>Scores</h2>",
            f"<p>Mean over {len(items)} images; 95% bootstrap interval over images "
            f"({metrics.BOOTSTRAP_RESAMPLES} resamples, seed {metrics.BOOTSTRAP_SEED}).</p>",
            _table(headline, ["score", "mean", "95% interval", "better", "what it is"])]
    if failure is not None:
        auc = failure.get("auroc")
        text = (f"AUROC {auc:.3f} (95% interval {failure['low']:.3f} to "
                f"{failure['high']:.3f})" if auc is not None else
                "AUROC not defined (this split needs both failed and successful images)")
        body.append(f"<p>Confidence ({html.escape(failure.get('name', metrics.CONFIDENCE))}) telling the "
                    f"{failure['failures']} failed images (IoU &lt; "
                    f"{metrics.JACCARD_THRESHOLD:g}) from the rest: {text}.</p>")
    charts = [f"<div><h3>Per-image IoU</h3>{iou_histogram_svg(iou)}</div>"]
    if review:
        charts.append(f"<div><h3>Review the least confident first</h3>{review_svg(review)}"
                      f"</div>")
    for label, curve in threshold_curves:
        charts.append(f"<div><h3>Threshold curve ({html.escape(label)})</h3>"
                      f"{threshold_svg(curve)}</div>")
    body.append('<div class="charts">' + "".join(charts) + "</div>")
    if review:
        body.append(_table([(f"{100 * r['set_aside']:g}%", r["images_kept"], r["iou"],
                             r["threshold_jaccard"],
                             f"{r['failures_set_aside']} of {r['failures']}")
                            for r in review],
                           ["set aside", "images kept", "mean IoU of the rest",
                            "thresholded Jaccard of the rest", "failures set aside"]))
    body.append("<h2>Every image</h2><p>True outline cyan, predicted yellow. Sort: "
                "<button onclick=\"sortBy('iou', false)\">worst IoU first</button>"
                "<button onclick=\"sortBy('confidence', false)\">least confident first"
                "</button><button onclick=\"sortBy('name', false)\">by name</button>"
                + (f" Shaded: confidence below the calibrated level {level:.3f}." if level
                   is not None else "") + "</p>")
    body.append('<div id="grid">' + "".join(_item(r, level) for r in items) + "</div>")
    page = ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
            + "\n".join(body) + f"<script>{SORT_SCRIPT}</script></body></html>\n")
    preprocess.write_text(path, page)
    return path


def _item(r, level):
    failed = r["iou"] < metrics.JACCARD_THRESHOLD
    low = level is not None and r["confidence"] < level
    classes = "item" + (" failed" if failed else "") + (" low" if low else "")
    name = html.escape(str(r["id"]))
    return (f'<figure class="{classes}" data-name="{name}" data-iou="{r["iou"]:.6f}" '
            f'data-confidence="{r["confidence"]:.6f}">'
            f'<img src="{html.escape(quote(r["thumbnail"]))}" alt="{name}" loading="lazy">'
            f"<figcaption><b>{name}</b><br>IoU {r['iou']:.3f}, thresholded Jaccard "
            f"{r['threshold_jaccard']:.3f}, confidence {r['confidence']:.3f}</figcaption>"
            "</figure>")


# ----------------------------------------------------------------------------- figures

FIGURE_MAX_SIDE = 1024  # bigger images are shrunk to this for the overlay figure


def save_overlay(image_path, prob, pred, truth, path, title, exif=True):
    """Image, probability map, and the predicted (and true) outline, shrunk for big images."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    h, w = prob.shape
    scale = min(1.0, FIGURE_MAX_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    side = FIGURE_MAX_SIDE
    image = cv2.resize(preprocess.read_image(image_path, min_hw=(side, side), exif=exif), size,
                       interpolation=cv2.INTER_AREA)
    fig, axes = plt.subplots(1, 3, figsize=(15, min(10, max(3, 5 * h / w)) + 0.6))
    axes[0].imshow(image)
    axes[0].set_title("image")
    shown = axes[1].imshow(cv2.resize(prob, size, interpolation=cv2.INTER_AREA), vmin=0, vmax=1,
                           cmap="magma")
    fig.colorbar(shown, ax=axes[1], fraction=0.046)
    axes[1].set_title("lesion probability")
    axes[2].imshow(image)
    handles = []
    for mask, colour, label in ((pred, "yellow", "predicted"), (truth, "cyan", "true")):
        if mask is None:
            continue
        small = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        if small.max() > 0:  # a zero border closes the outline of a lesion cut by the frame
            padded = np.pad(small, 1)
            axes[2].contour(np.arange(-1, size[0] + 1), np.arange(-1, size[1] + 1), padded,
                            levels=[0.5 * small.max()], colors=colour, linewidths=1.5)
        handles.append(Line2D([], [], color=colour, label=f"{label} outline"))
    axes[2].set(xlim=(-0.5, size[0] - 0.5), ylim=(size[1] - 0.5, -0.5))
    axes[2].legend(handles=handles, loc="lower right", fontsize=8)
    axes[2].set_title("outlines")
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    preprocess.save_figure(fig, path)


def plot_analysis(hist, edges, curve, best, path, title):
    """The histogram and the score curves; `best`: (the best row, the score it maximises)."""
    best, best_by = best
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for row, colour, label in ((0, "tab:blue", "background pixels"),
                               (1, "tab:red", "lesion pixels")):
        left.stairs(hist[row], edges, color=colour, label=label)
    left.set_yscale("log", nonpositive="clip")  # empty bins drop to the axis
    left.set(xlabel="predicted lesion probability", ylabel="pixels (log scale)",
             title="where the probabilities cluster", xlim=(0, 1), ylim=(0.8, None))
    left.legend()
    t = [row["threshold"] for row in curve]
    # thresholded Jaccard equals IoU wherever every image scores >= 0.65: dashed on top of
    # a thicker IoU line, so both stay visible where they coincide
    for key, label, style, width in (("iou", "mean IoU", "o-", 3.0),
                                     ("threshold_jaccard", "thresholded Jaccard", "s--", 1.2),
                                     ("dice", "mean Dice", "^-", 1.2)):
        right.plot(t, [row[key] for row in curve], style, ms=3, lw=width, label=label)
    right.axvline(best["threshold"], color="grey", ls="--", lw=1,
                  label=f"best {best_by}: {best['threshold']:g}")
    right.set(xlabel="threshold", ylabel="score", title="score against threshold", xlim=(0, 1))
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    preprocess.save_figure(fig, path)


# ----------------------------------------------------------------------------- variants


# ----------------------------------------------------------------------------- from a run

def write_evaluation(out, rows, summary, title, facts, level=None):
    """report.html in `out` from per-image rows (id, iou, threshold_jaccard, confidence; the
    thumbnails in out/thumbnails/<id>.jpg) and the summary (each metric's mean under its
    name, intervals, confidence, review curve). Threshold curves that --threshold-analysis left beside `out` are shown too."""
    curves = []
    for table in sorted(out.parent.glob("threshold_*/threshold_curve.csv")):
        with open(table) as f:
            curves.append((table.parent.name.removeprefix("threshold_") + " split",
                           list(csv.DictReader(f))))
    items = [{"id": r["id"], "iou": float(r["iou"]), "confidence": float(r["confidence"]),
              "threshold_jaccard": float(r["threshold_jaccard"]),
              "thumbnail": f"thumbnails/{r['id']}.jpg"} for r in rows]
    write_report(out / "report.html", title, facts, headline_rows(summary), items,
                 Judgement(summary.get("review_curve"), summary.get("confidence"), curves,
                           level))
    print(f"report: {out / 'report.html'} ({len(items)} thumbnails in {out / 'thumbnails'})")


def judgement_lines(summary):
    """The console lines of the intervals, the confidence's AUROC and the review curve."""
    lines = ["means with 95% bootstrap intervals over images: " + ", ".join(
        f"{k} {v['mean']:.4f} [{v['low']:.4f}, {v['high']:.4f}]"
        for k, v in summary["intervals"].items())]
    conf = summary.get("confidence")
    if not conf:
        return lines
    if conf["auroc"] is None:
        lines.append(f"confidence ({conf['name']}): no AUROC, the split needs failed (IoU < "
                     f"{metrics.JACCARD_THRESHOLD:g}) and successful images ({conf['failures']} "
                     f"failed of {conf['images']})")
    else:
        lines.append(f"confidence ({conf['name']}) AUROC for the {conf['failures']} failed "
                     f"images of {conf['images']}: {conf['auroc']:.3f} [{conf['low']:.3f}, "
                     f"{conf['high']:.3f}]")
    lines.append("set aside the least confident: " + "; ".join(
        f"{100 * r['set_aside']:g}% -> IoU {r['iou']:.4f}, thresholded Jaccard "
        f"{r['threshold_jaccard']:.4f}" for r in summary["review_curve"]))
    return lines
