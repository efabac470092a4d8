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
