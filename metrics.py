"""Per-image segmentation scores, defined as the official ISIC scorer defines them.

Every score is computed per image from its confusion counts, then averaged over images,
so a split's score never depends on the batch size. Where a denominator is zero the score
is 1.0 (both masks empty is a perfect answer), as `isic-challenge-scoring` computes it.
"""
import numpy as np
import torch

import preprocess

JACCARD_THRESHOLD = 0.65  # ISIC 2018 Task 1: an image's IoU below this counts as 0
SCORE_NAMES = ("iou", "dice", "threshold_jaccard", "sensitivity", "specificity", "accuracy")


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


def confusion_at_original(prob, truth, threshold=0.5):
    """(tp, fp, fn, tn) of a probability map at network size against a true mask at its own
    size: the map is resized to the mask's size (bilinear), then cut at prob >= threshold.
    Validation during training and test_model.py --evaluate both score this way."""
    return confusion(preprocess.binarise(preprocess.prob_to_original(prob, truth.shape),
                                         threshold), truth)


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


def scores(tp, fp, fn, tn):
    """The scores of one image from its confusion counts."""
    iou = _ratio(tp, tp + fp + fn)
    return {
        "iou": iou,
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "threshold_jaccard": iou if iou >= JACCARD_THRESHOLD else 0.0,
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
    }


def mean_scores(counts):
    """Mean of each score over images, from an iterable of (tp, fp, fn, tn)."""
    per_image = [scores(*map(int, c)) for c in counts]
    if not per_image:
        return {name: float("nan") for name in SCORE_NAMES} | {"images": 0}
    means = {name: float(np.mean([s[name] for s in per_image])) for name in SCORE_NAMES}
    means["images"] = len(per_image)
    return means


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


def failure_auroc_interval(confidence, iou, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED,
                           level=LEVEL):
    """{"auroc", "low", "high", "failures", "images"}; the interval resamples images, and a
    resample without a failure or without a success is drawn again in effect (left out)."""
    confidence = np.asarray(confidence, np.float64)
    iou = np.asarray(iou, np.float64)
    value = failure_auroc(confidence, iou)
    out = {"auroc": value, "low": None, "high": None, "failures": int(failed(iou).sum()),
           "images": int(iou.size)}
    if value is None:
        return out
    values = [failure_auroc(confidence[i], iou[i])
              for i in _resample_indices(iou.size, resamples, seed)]
    values = [v for v in values if v is not None]
    tail = (1 - level) / 2
    out["low"], out["high"] = (float(q) for q in np.quantile(values, [tail, 1 - tail]))
    return out


def paired_auroc(conf_a, conf_b, iou, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED,
                 level=LEVEL):
    """AUROC of confidence a minus that of b on the same images, with a paired interval (the
    same resampled images for both)."""
    conf_a, conf_b = np.asarray(conf_a, np.float64), np.asarray(conf_b, np.float64)
    iou = np.asarray(iou, np.float64)
    a, b = failure_auroc(conf_a, iou), failure_auroc(conf_b, iou)
    if a is None:
        return None
    diffs = []
    for i in _resample_indices(iou.size, resamples, seed):
        da, db = failure_auroc(conf_a[i], iou[i]), failure_auroc(conf_b[i], iou[i])
        if da is not None:
            diffs.append(da - db)
    tail = (1 - level) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
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
# A confidence comes from the model's own output, never from the truth. Each candidate reads
# `maps`, the (V, h, w) probability maps at network size behind one image: every member of
# an ensemble, each under the 4 flip views (identity first, then horizontal, vertical, both),
# member after member. Which one test_model.py reports was chosen by measurement
# (docs/evaluation.md).

FLIP_VIEWS = 4  # views per member in `maps`


def soft_iou(prob, threshold=0.5):
    """Soft IoU of a probability map with its own thresholded mask: sum(min(p, m)) /
    sum(max(p, m)). 1 when every pixel is certain; falls as probabilities near the threshold
    spread over the image. A map with no lesion and no doubt (all 0) is 1."""
    prob = np.asarray(prob, np.float32)
    mask = (prob >= np.float32(threshold)).astype(np.float32)
    union = float(np.maximum(prob, mask).sum())
    return float(np.minimum(prob, mask).sum()) / union if union else 1.0


def soft_agreement(maps):
    """How much the maps agree: sum of the pixelwise minimum over sum of the maximum (a
    soft IoU of all the maps at once). 1 when they are identical."""
    maps = np.asarray(maps, np.float32)
    union = float(maps.max(0).sum())
    return float(maps.min(0).sum()) / union if union else 1.0


def mask_agreement(maps, threshold=0.5):
    """IoU of the pixels every map calls lesion with the pixels any map calls lesion."""
    masks = np.asarray(maps, np.float32) >= np.float32(threshold)
    union = int(masks.any(0).sum())
    return int(masks.all(0).sum()) / union if union else 1.0


def soft_iou_largest(prob, threshold=0.5):
    """Soft IoU of a probability map with its largest lesion region, holes filled (the mask
    post-processing keeps): also low where probability is spread over several regions."""
    prob = np.asarray(prob, np.float32)
    region = preprocess.largest_region_filled(prob >= np.float32(threshold)).astype(np.float32)
    union = float(np.maximum(prob, region).sum())
    return float(np.minimum(prob, region).sum()) / union if union else 1.0


def identity_views(maps):
    """Each member's map without test-time views."""
    return np.asarray(maps)[::FLIP_VIEWS]


def confidence_candidates(maps, threshold=0.5):
    """{name: confidence in [0, 1]} of one image from its (members x 4 flip views) maps."""
    maps = np.asarray(maps, np.float32)
    plain = identity_views(maps)
    base = soft_iou(plain.mean(0), threshold)  # the baseline: no test-time views
    agree = soft_agreement(maps)
    return {
        "soft_iou": base,
        "soft_iou_flips": soft_iou(maps.mean(0), threshold),
        "view_agreement": agree,
        "mask_agreement": mask_agreement(maps, threshold),
        "soft_iou_x_agreement": base * agree,
        "soft_iou_largest": soft_iou_largest(plain.mean(0), threshold),
        # an ensemble's members without views (1 for a single model: it needs members)
        "member_agreement": soft_agreement(plain),
        "soft_iou_x_members": base * soft_agreement(plain),
    }


CANDIDATES = ("soft_iou", "soft_iou_flips", "view_agreement", "mask_agreement",
              "soft_iou_x_agreement", "soft_iou_largest", "member_agreement",
              "soft_iou_x_members")
CONFIDENCE = "soft_iou_largest"  # the candidate reported as "confidence" (measured: docs/evaluation.md)


INTERVAL_SCORES = ("iou", "dice", "threshold_jaccard")  # the means reported with an interval


def judge(rows, confidence=CONFIDENCE):
    """What summary.json adds to the means, from per-image rows (dicts with iou, dice,
    threshold_jaccard and, where measured, confidence_<candidate>): each mean with its
    interval; the confidence's AUROC for failures, every candidate's beside it (paired against
    the baseline soft_iou), the level that sets aside 90% of the failures; the review curve."""
    iou = [float(r["iou"]) for r in rows]
    out = {"bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED,
                         "level": LEVEL},
           "intervals": {k: mean_with_interval([float(r[k]) for r in rows])
                         for k in INTERVAL_SCORES}}
    if not rows or f"confidence_{confidence}" not in rows[0]:
        return out
    values = {name: [float(r[f"confidence_{name}"]) for r in rows] for name in CANDIDATES
              if f"confidence_{name}" in rows[0]}
    chosen = values[confidence]
    candidates = {}
    for name, conf in values.items():
        candidates[name] = {**failure_auroc_interval(conf, iou),
                            "review_curve": review_curve(conf, iou)}
        if name != "soft_iou" and "soft_iou" in values:
            candidates[name]["vs_soft_iou"] = paired_auroc(conf, values["soft_iou"], iou)
    level = calibration_level(chosen, iou)
    below = np.asarray(chosen) < level if level is not None else np.zeros(len(iou), bool)
    out["confidence"] = {"name": confidence, **candidates[confidence], "level_90": level,
                         "level_90_images": int(below.sum()),
                         "level_90_failures": int((below & failed(iou)).sum()),
                         "candidates": candidates}
    out["review_curve"] = review_curve(chosen, iou)
    return out
