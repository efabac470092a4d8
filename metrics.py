"""The per-image metrics of the project, in one registry, and the statistics over images.

Every metric is computed per image at the image's original size, then averaged over images,
so a split's score never depends on the batch size. `REGISTRY` holds one `Metric` per score:
how it is computed (from the four confusion counts, or from the predicted and true masks),
whether its mean gets a bootstrap interval, which direction is better, and whether training
writes it to the per-epoch CSV. Validation during training, test_model.py's per_image.csv,
summary.json, report.html and --cross-validation all read it: a metric added here appears in
all of them.

The six ISIC scores are defined as the official scorer (`isic-challenge-scoring`) defines
them: where a denominator is zero the score is 1.0 (both masks empty is a perfect answer).
"""
import math
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np
import torch

import preprocess

JACCARD_THRESHOLD = 0.65  # ISIC 2018 Task 1: an image's IoU below this counts as 0
NSD_TOLERANCE = 5.0       # px at the original size: boundary within it counts as matched (nsd)
HD_PERCENTILE = 95        # hd95: this percentile of the boundary distances


def confusion(pred, truth):
    """(tp, fp, fn, tn) of two boolean masks of one image."""
    pred = np.asarray(pred, bool)
    truth = np.asarray(truth, bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in size")
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred)) - tp
    fn = int(np.count_nonzero(truth)) - tp
    tn = pred.size - tp - fp - fn
    return tp, fp, fn, tn


def batch_confusion(prob, truth, threshold=0.5):
    """Per-image (tp, fp, fn, tn) for a batch: prob and truth of shape (N, 1, H, W).

    Returns an (N, 4) int64 tensor; prediction is prob >= threshold, truth is > 0.5."""
    pred = (prob >= threshold).flatten(1)
    true = (truth > 0.5).flatten(1)
    tp = (pred & true).sum(1)
    fp = pred.sum(1) - tp
    fn = true.sum(1) - tp
    tn = pred.shape[1] - tp - fp - fn
    return torch.stack([tp, fp, fn, tn], 1).long()


def _ratio(num, den):
    return num / den if den else 1.0


def _iou(tp, fp, fn, tn):
    return _ratio(tp, tp + fp + fn)


def _threshold_jaccard(tp, fp, fn, tn):
    iou = _iou(tp, fp, fn, tn)
    return iou if iou >= JACCARD_THRESHOLD else 0.0


# ----------------------------------------------------------------------------- boundaries

CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))


def _boundary(mask):
    """Boundary pixels of a bool mask: lesion pixels with a 4-neighbour that is background or
    lies beyond the array's edge."""
    m = mask.astype(np.uint8)
    return (m - cv2.erode(m, CROSS, borderType=cv2.BORDER_CONSTANT, borderValue=0)) > 0


def _box(mask):
    """(row slice, column slice) of a bool mask's lesion with a 1-pixel margin (inside the
    array): its boundary pixels, as _boundary finds them there, are those of the whole mask."""
    x, y, w, h = cv2.boundingRect(mask.view(np.uint8))
    rows, cols = mask.shape
    return slice(max(y - 1, 0), min(y + h + 1, rows)), slice(max(x - 1, 0), min(x + w + 1, cols))


def boundary_points(mask):
    """(n, 2) float64 (row, column) of the boundary pixels of a bool mask that holds lesion."""
    box = _box(mask)
    rows, cols = np.nonzero(_boundary(mask[box]))
    return np.stack([rows + box[0].start, cols + box[1].start], 1).astype(np.float64)


class MaskPair:
    """The predicted and true masks of one image, what a mask metric reads; the boundary
    distances are computed once for every metric that asks.

    Boundaries are found in each mask's bounding box only, and the nearest boundary pixel by
    a k-d tree over the other mask's boundary pixels (exact Euclidean distances), so the cost
    follows the lesions' outlines more than the image's size (docs/evaluation.md)."""

    def __init__(self, pred, truth):
        self.pred, self.truth = np.asarray(pred, bool), np.asarray(truth, bool)
        self._distances = None

    def empty(self):
        """(predicted mask empty, true mask empty)"""
        return not self.pred.any(), not self.truth.any()

    def diagonal(self):
        """The image's diagonal (px): longer than any distance inside the image."""
        return math.hypot(*self.truth.shape)

    def distances(self):
        """(distance of each predicted boundary pixel to the true boundary, of each true
        boundary pixel to the predicted boundary), in px; both masks must hold lesion."""
        if self._distances is None:
            from scipy.spatial import cKDTree  # scipy comes with albumentations

            pred, true = boundary_points(self.pred), boundary_points(self.truth)
            self._distances = (cKDTree(true).query(pred)[0], cKDTree(pred).query(true)[0])
        return self._distances


def hd95(pair):
    """95th-percentile Hausdorff distance (px, at the mask's size): the larger of the 95th
    percentiles (numpy's linear interpolation) of the two directed boundary distances. Both
    masks empty: 0; one empty: the image's diagonal (a worse value than any real one)."""
    pred_empty, true_empty = pair.empty()
    if pred_empty or true_empty:
        return 0.0 if pred_empty and true_empty else pair.diagonal()
    return float(max(np.percentile(d, HD_PERCENTILE) for d in pair.distances()))


def nsd(pair, tolerance=None):
    """Normalised surface distance at NSD_TOLERANCE px: the share of the boundary pixels of
    both masks that lie within the tolerance of the other mask's boundary. 1: the outlines
    agree within the tolerance; both masks empty: 1; one empty: 0."""
    tolerance = NSD_TOLERANCE if tolerance is None else tolerance
    pred_empty, true_empty = pair.empty()
    if pred_empty or true_empty:
        return 1.0 if pred_empty and true_empty else 0.0
    to_truth, to_pred = pair.distances()
    close = np.count_nonzero(to_truth <= tolerance) + np.count_nonzero(to_pred <= tolerance)
    return float(close / (to_truth.size + to_pred.size))


# ----------------------------------------------------------------------------- the registry

@dataclass(frozen=True)
class Metric:
    """One per-image metric. source "counts": compute(tp, fp, fn, tn); source "masks":
    compute(MaskPair). interval: its mean gets a bootstrap interval (summary.json, report);
    logged: training scores it every epoch, as the CSV column valid_<name>."""
    name: str
    compute: Callable
    source: str = "counts"
    interval: bool = False
    higher_is_better: bool = True
    logged: bool = False
    about: str = ""


REGISTRY = [
    Metric("iou", _iou, interval=True, logged=True, about="Jaccard |P∩T| / |P∪T|"),
    Metric("dice", lambda tp, fp, fn, tn: _ratio(2 * tp, 2 * tp + fp + fn), interval=True,
           logged=True, about="2|P∩T| / (|P| + |T|)"),
    Metric("threshold_jaccard", _threshold_jaccard, interval=True, logged=True,
           about=f"the ISIC 2018 ranking metric: IoU, or 0 below {JACCARD_THRESHOLD:g}"),
    Metric("sensitivity", lambda tp, fp, fn, tn: _ratio(tp, tp + fn), about="TP / (TP + FN)"),
    Metric("specificity", lambda tp, fp, fn, tn: _ratio(tn, tn + fp), about="TN / (TN + FP)"),
    Metric("accuracy", lambda tp, fp, fn, tn: _ratio(tp + tn, tp + fp + fn + tn),
           about="(TP + TN) / all pixels"),
    Metric("hd95", hd95, source="masks", interval=True, higher_is_better=False,
           about="95th-percentile Hausdorff distance of the outlines, px at original size"),
    Metric("nsd", nsd, source="masks", interval=True,
           about=f"normalised surface distance: outline share within {NSD_TOLERANCE:g} px"),
]
ISIC_NAMES = ("iou", "dice", "threshold_jaccard", "sensitivity", "specificity", "accuracy")
SCORE_NAMES = ISIC_NAMES  # the six ISIC scores (scores() also gives any count metric added)


def names(logged=None, interval=None):
    """The registry's metric names, in order; `logged`/`interval` pick those with that flag."""
    return [m.name for m in REGISTRY if (logged is None or m.logged == logged)
            and (interval is None or m.interval == interval)]


def image_scores(pred, truth, only=None):
    """{name: value} of one image's predicted and true bool masks, for every metric of the
    registry (or those named in `only`)."""
    chosen = [m for m in REGISTRY if only is None or m.name in only]
    counts = confusion(pred, truth) if any(m.source == "counts" for m in chosen) else None
    pair = MaskPair(pred, truth)
    return {m.name: float(m.compute(*counts) if m.source == "counts" else m.compute(pair))
            for m in chosen}


def predicted_mask(prob, hw, threshold=0.5, postprocess=False):
    """The lesion mask (bool) at (h, w) of a probability map (network size, a tuple of an
    ensemble's maps, or already at (h, w)): resized (bilinear), cut at prob >= threshold,
    and with `postprocess` the largest region kept with its holes filled."""
    pred = preprocess.binarise(preprocess.prob_to_original(prob, hw), threshold)
    return preprocess.largest_region_filled(pred) if postprocess else pred


def score_at_original(prob, truth, threshold=0.5, postprocess=False, only=None):
    """(predicted mask, {name: value}) of a probability map against a true mask at its own
    size. Validation during training, --evaluate, --cross-validation and
    --threshold-analysis all score an image through here."""
    pred = predicted_mask(prob, truth.shape, threshold, postprocess)
    return pred, image_scores(pred, truth, only)


def confusion_at_original(prob, truth, threshold=0.5):
    """(tp, fp, fn, tn) of a probability map at network size against a true mask at its own
    size, as score_at_original cuts it."""
    return confusion(predicted_mask(prob, truth.shape, threshold), truth)


def scores(tp, fp, fn, tn):
    """The count scores (the six ISIC ones, and any registry metric from the counts)."""
    return {m.name: m.compute(tp, fp, fn, tn) for m in REGISTRY if m.source == "counts"}


def mean_scores(counts):
    """Mean of each count score over images, from an iterable of (tp, fp, fn, tn)."""
    return means([scores(*map(int, c)) for c in counts],
                 [m.name for m in REGISTRY if m.source == "counts"])


def means(rows, only=None):
    """{name: mean over rows, "images": how many} of per-image score dicts (every name the
    first row holds, or those in `only`); nan for no rows."""
    rows = list(rows)
    keys = only or (list(rows[0]) if rows else names())
    out = {k: float(np.mean([float(r[k]) for r in rows])) if rows else float("nan")
           for k in keys}
    out["images"] = len(rows)
    return out


# ----------------------------------------------------------------------------- intervals

BOOTSTRAP_RESAMPLES = 2000  # resamples of the images behind every 95% interval
BOOTSTRAP_SEED = 0          # fixed, so that a report repeats to the last digit
LEVEL = 0.95                # coverage of the intervals


def _resample_indices(n, resamples, seed):
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_interval(values, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED, level=LEVEL):
    """(low, high): percentile bootstrap interval of the mean of per-image values, resampling
    images with replacement. (nan, nan) for no values."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    means = values[_resample_indices(values.size, resamples, seed)].mean(1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def mean_with_interval(values, **kw):
    """{"mean", "low", "high"} of per-image values."""
    low, high = bootstrap_interval(values, **kw)
    return {"mean": float(np.mean(values)) if len(values) else float("nan"),
            "low": low, "high": high}


def paired_bootstrap(mine, theirs, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED,
                     level=LEVEL):
    """Mean of mine - theirs over the same images, with the interval of the per-image
    differences resampled together (the pairing removes the images' own spread), and the
    share of resamples in which mine is not ahead."""
    diff = np.asarray(mine, np.float64) - np.asarray(theirs, np.float64)
    if diff.size == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "p_not_ahead":
                float("nan"), "images": 0}
    means = diff[_resample_indices(diff.size, resamples, seed)].mean(1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return {"mean": float(diff.mean()), "low": float(low), "high": float(high),
            "p_not_ahead": float(np.mean(means <= 0)), "images": int(diff.size)}


# ----------------------------------------------------------------------------- failures

def failed(iou):
    """Images that fail the ISIC 2018 rule: IoU below 0.65, so a thresholded Jaccard of 0."""
    return np.asarray(iou, np.float64) < JACCARD_THRESHOLD


def auroc(score, positive):
    """Area under the ROC curve of `score` for telling positives from negatives: the chance
    that a random positive scores above a random negative, ties counting a half
    (Mann-Whitney U from mid-ranks). None when either class is empty."""
    score = np.asarray(score, np.float64)
    positive = np.asarray(positive, bool)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(score.size)
    sorted_score = score[order]
    # mid-ranks: every run of equal scores shares the mean of its ranks
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_score)) + 1]
    ends = np.r_[starts[1:], score.size]
    mid = (starts + ends + 1) / 2.0  # ranks are 1-based
    ranks[order] = np.repeat(mid, ends - starts)
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def failure_auroc(confidence, iou):
    """How well a low confidence points at a failed image: AUROC of -confidence for
    IoU < 0.65. 1.0: every failure is less confident than every success; 0.5: chance."""
    return auroc(-np.asarray(confidence, np.float64), failed(iou))


def resampled_failure_aurocs(confidence, iou, resamples=BOOTSTRAP_RESAMPLES,
                             seed=BOOTSTRAP_SEED):
    """failure_auroc of every bootstrap resample of the images at once (the resamples of
    _resample_indices), nan where a resample lacks a failure or a success. Each resample
    weighs each image by how often it was drawn: the AUROC is the weighted share of
    (failure, success) pairs in which the failure is less confident, ties counting a half."""
    confidence = np.asarray(confidence, np.float64)
    fails = failed(iou)
    n = confidence.size
    idx = _resample_indices(n, resamples, seed)
    drawn = np.zeros((resamples, n))
    np.add.at(drawn, (np.arange(resamples)[:, None], idx), 1.0)
    f, s = -confidence[fails], -confidence[~fails]
    ahead = (f[:, None] > s[None, :]) + 0.5 * (f[:, None] == s[None, :])  # (failures, successes)
    weight_f, weight_s = drawn[:, fails], drawn[:, ~fails]
    pairs = weight_f.sum(1) * weight_s.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, ((weight_f @ ahead) * weight_s).sum(1) / pairs, np.nan)


def failure_auroc_interval(confidence, iou, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED,
                           level=LEVEL):
    """{"auroc", "low", "high", "failures", "images"}; the interval resamples images, and a
    resample without a failure or without a success is drawn again in effect (left out)."""
    iou = np.asarray(iou, np.float64)
    value = failure_auroc(confidence, iou)
    out = {"auroc": value, "low": None, "high": None, "failures": int(failed(iou).sum()),
           "images": int(iou.size)}
    if value is None:
        return out
    values = resampled_failure_aurocs(confidence, iou, resamples, seed)
    tail = (1 - level) / 2
    out["low"], out["high"] = (float(q) for q in np.nanquantile(values, [tail, 1 - tail]))
    return out


def paired_auroc(conf_a, conf_b, iou, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED,
                 level=LEVEL):
    """AUROC of confidence a minus that of b on the same images, with a paired interval (the
    same resampled images for both)."""
    a, b = failure_auroc(conf_a, iou), failure_auroc(conf_b, iou)
    if a is None:
        return None
    diffs = resampled_failure_aurocs(conf_a, iou, resamples, seed) - \
        resampled_failure_aurocs(conf_b, iou, resamples, seed)
    tail = (1 - level) / 2
    low, high = np.nanquantile(diffs, [tail, 1 - tail])
    return {"mean": a - b, "low": float(low), "high": float(high)}


REVIEW_FRACTIONS = (0.0, 0.05, 0.10, 0.20, 0.30)  # shares of least confident images set aside


def least_confident_first(confidence):
    """Image order for review: lowest confidence first (ties in the order given)."""
    return np.argsort(np.asarray(confidence, np.float64), kind="mergesort")


def review_curve(confidence, iou, fractions=REVIEW_FRACTIONS):
    """Set aside the k% least confident images for a person to review: the mean IoU and
    thresholded Jaccard of the images kept, and the share of the failures set aside."""
    iou = np.asarray(iou, np.float64)
    order = least_confident_first(confidence)
    fails = failed(iou)
    rows = []
    for k in fractions:
        aside = int(round(k * iou.size))
        kept = iou[order[aside:]]
        rows.append({"set_aside": k, "images_set_aside": aside, "images_kept": int(kept.size),
                     "iou": float(kept.mean()) if kept.size else float("nan"),
                     "threshold_jaccard": float(np.where(kept >= JACCARD_THRESHOLD, kept, 0)
                                                .mean()) if kept.size else float("nan"),
                     "failures_set_aside": int(fails[order[:aside]].sum()),
                     "failures": int(fails.sum())})
    return rows


def calibration_level(confidence, iou, catch=0.9):
    """The confidence level below which `catch` of the failed images fall: midway between the
    least confident share of failures to catch and the next confidence above it, so that
    "confidence < level" sets aside exactly those (and any success below them). None when
    there is no failure."""
    confidence = np.asarray(confidence, np.float64)
    fails = np.sort(confidence[failed(iou)])
    if fails.size == 0:
        return None
    top = fails[int(np.ceil(catch * fails.size)) - 1]
    above = confidence[confidence > top]
    nxt = above.min() if above.size else min(1.0, top + 1e-3)
    return float((top + nxt) / 2)


# ----------------------------------------------------------------------------- confidence
#
# A confidence comes from the model's own output, never from the truth, and from the map the
# prediction already made: no forward pass runs for it. benchmarks/confidence_study.py
# measures the formulas that were tried against each other (docs/evaluation.md).


def soft_iou(prob, threshold=0.5):
    """Soft IoU of a probability map with its own thresholded mask: sum(min(p, m)) /
    sum(max(p, m)). 1 when every pixel is certain; falls as probabilities near the threshold
    spread over the image. A map with no lesion and no doubt (all 0) is 1."""
    prob = np.asarray(prob, np.float32)
    mask = (prob >= np.float32(threshold)).astype(np.float32)
    union = float(np.maximum(prob, mask).sum())
    return float(np.minimum(prob, mask).sum()) / union if union else 1.0


def soft_iou_largest(prob, threshold=0.5):
    """Soft IoU of a probability map with its largest lesion region, holes filled (the mask
    post-processing keeps): also low where probability is spread over several regions."""
    prob = np.asarray(prob, np.float32)
    region = preprocess.largest_region_filled(prob >= np.float32(threshold)).astype(np.float32)
    union = float(np.maximum(prob, region).sum())
    return float(np.minimum(prob, region).sum()) / union if union else 1.0


CONFIDENCE = "soft_iou_largest"  # what "confidence" is (measured: docs/evaluation.md)
confidence = soft_iou_largest


def judge(rows, confidence_key="confidence"):
    """What summary.json adds to the means, from per-image rows (dicts of the registry's
    scores and, where measured, `confidence_key`): each interval metric's mean with its
    interval; the confidence's AUROC for failures, the level that sets aside 90% of the
    failures, and the review curve."""
    iou = [float(r["iou"]) for r in rows]
    out = {"bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED,
                         "level": LEVEL},
           "intervals": {k: mean_with_interval([float(r[k]) for r in rows])
                         for k in names(interval=True) if not rows or k in rows[0]}}
    if not rows or confidence_key not in rows[0]:
        return out
    chosen = [float(r[confidence_key]) for r in rows]
    level = calibration_level(chosen, iou)
    below = np.asarray(chosen) < level if level is not None else np.zeros(len(iou), bool)
    out["confidence"] = {"name": CONFIDENCE, **failure_auroc_interval(chosen, iou),
                         "level_90": level, "level_90_images": int(below.sum()),
                         "level_90_failures": int((below & failed(iou)).sum())}
    out["review_curve"] = review_curve(chosen, iou)
    return out
