"""metrics.py on masks drawn by hand: the values DESIGN.md defines, and the official scorer's."""
import numpy as np
import pytest
import torch

import metrics


def box(shape, rows, cols):
    mask = np.zeros(shape, bool)
    mask[rows, cols] = True
    return mask


SHAPE = (4, 4)
TRUTH = box(SHAPE, slice(None), slice(0, 2))  # columns 0-1: 8 lesion pixels

# (prediction, truth, expected scores): each worked out by hand from the definitions
CASES = {
    "identical": (TRUTH, TRUTH, dict(iou=1, dice=1, threshold_jaccard=1, sensitivity=1,
                                     specificity=1, accuracy=1)),
    "disjoint": (box(SHAPE, slice(None), slice(2, 4)), TRUTH,
                 dict(iou=0, dice=0, threshold_jaccard=0, sensitivity=0, specificity=0,
                      accuracy=0)),
    # columns 1-2 against 0-1: tp 4, fp 4, fn 4, tn 4
    "half overlap": (box(SHAPE, slice(None), slice(1, 3)), TRUTH,
                     dict(iou=4 / 12, dice=8 / 16, threshold_jaccard=0, sensitivity=0.5,
                          specificity=0.5, accuracy=0.5)),
    # column 0 inside columns 0-1: tp 4, fp 0, fn 4, tn 8
    "half of the lesion": (box(SHAPE, slice(None), slice(0, 1)), TRUTH,
                           dict(iou=0.5, dice=8 / 12, threshold_jaccard=0, sensitivity=0.5,
                                specificity=1, accuracy=12 / 16)),
    "both empty": (np.zeros(SHAPE, bool), np.zeros(SHAPE, bool),
                   dict(iou=1, dice=1, threshold_jaccard=1, sensitivity=1, specificity=1,
                        accuracy=1)),
    "empty prediction": (np.zeros(SHAPE, bool), TRUTH,
                         dict(iou=0, dice=0, threshold_jaccard=0, sensitivity=0, specificity=1,
                              accuracy=0.5)),
    # a full prediction of an image without lesion: no negatives to find, specificity 0
    "full prediction, no lesion": (np.ones(SHAPE, bool), np.zeros(SHAPE, bool),
                                   dict(iou=0, dice=0, threshold_jaccard=0, sensitivity=1,
                                        specificity=0, accuracy=0)),
}


@pytest.mark.parametrize("name", CASES)
def test_scores_of_hand_drawn_masks(name):
    pred, truth, expected = CASES[name]
    got = metrics.scores(*metrics.confusion(pred, truth))
    assert set(got) == set(metrics.SCORE_NAMES)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.parametrize("name", CASES)
def test_scores_equal_the_official_scorer(name):
    from isic_challenge_scoring import metrics as official
    from isic_challenge_scoring.confusion import create_binary_confusion_matrix

    pred, truth, _ = CASES[name]
    cm = create_binary_confusion_matrix(truth_binary_values=truth, prediction_binary_values=pred)
    got = metrics.scores(*metrics.confusion(pred, truth))
    assert got["iou"] == pytest.approx(official.binary_jaccard(cm))
    assert got["dice"] == pytest.approx(official.binary_dice(cm))
    assert got["threshold_jaccard"] == pytest.approx(official.binary_threshold_jaccard(cm, 0.65))
    assert got["sensitivity"] == pytest.approx(official.binary_sensitivity(cm))
    assert got["specificity"] == pytest.approx(official.binary_specificity(cm))
    assert got["accuracy"] == pytest.approx(official.binary_accuracy(cm))


def test_confusion_counts():
    pred, truth, _ = CASES["half overlap"]
    assert metrics.confusion(pred, truth) == (4, 4, 4, 4)
    with pytest.raises(ValueError):
        metrics.confusion(np.zeros((2, 3)), np.zeros((3, 2)))


def test_threshold_jaccard_keeps_an_iou_of_exactly_0_65_and_drops_below():
    assert metrics.scores(13, 7, 0, 80)["threshold_jaccard"] == pytest.approx(0.65)  # 13/20
    assert metrics.scores(64, 36, 0, 0)["threshold_jaccard"] == 0.0  # 0.64


def test_mean_is_over_images_not_pixels():
    # a large perfect image and a small missed one: the mean IoU is 0.5, not the pooled 0.99
    counts = [(990, 0, 0, 10), (0, 0, 10, 0)]
    means = metrics.mean_scores(counts)
    assert means["iou"] == 0.5 and means["images"] == 2
    assert means["sensitivity"] == 0.5 and means["accuracy"] == 0.5
    empty = metrics.mean_scores([])
    assert empty["images"] == 0 and np.isnan(empty["iou"])


def test_batch_confusion_equals_per_image_confusion():
    rng = np.random.default_rng(0)
    prob = rng.random((3, 1, 8, 8)).astype(np.float32)
    prob[0, 0, 0, 0] = 0.5  # on the threshold: lesion
    truth = (rng.random((3, 1, 8, 8)) < 0.4).astype(np.float32)
    batch = metrics.batch_confusion(torch.from_numpy(prob), torch.from_numpy(truth), 0.5)
    for i in range(3):
        assert tuple(batch[i].tolist()) == metrics.confusion(prob[i, 0] >= 0.5, truth[i, 0] > 0.5)


# ----------------------------------------------------------------------------- intervals

def test_bootstrap_interval_of_two_values_is_their_range():
    # resampling [0, 1] twice gives means 0, 0.5, 1 with chances 1/4, 1/2, 1/4: the 2.5% and
    # 97.5% quantiles are 0 and 1
    assert metrics.bootstrap_interval([0.0, 1.0], resamples=4000) == (0.0, 1.0)


def test_bootstrap_interval_of_a_known_sample_matches_its_standard_error():
    # 100 values, half 0 and half 1: mean 0.5, standard error 0.05, so about 0.5 ± 1.96 * 0.05
    values = [0.0, 1.0] * 50
    low, high = metrics.bootstrap_interval(values, resamples=4000, seed=1)
    assert low == pytest.approx(0.5 - 1.96 * 0.05, abs=0.012)
    assert high == pytest.approx(0.5 + 1.96 * 0.05, abs=0.012)
    assert metrics.bootstrap_interval(values, seed=1) == metrics.bootstrap_interval(values, seed=1)
    assert metrics.bootstrap_interval([0.7] * 9) == (pytest.approx(0.7), pytest.approx(0.7))


def test_paired_bootstrap_removes_the_images_own_spread():
    rng = np.random.default_rng(0)
    theirs = rng.random(50)  # images of very different difficulty
    mine = theirs + 0.01     # ahead by 0.01 on every one
    paired = metrics.paired_bootstrap(mine, theirs)
    assert paired["mean"] == pytest.approx(0.01)
    assert paired["low"] == pytest.approx(0.01) and paired["high"] == pytest.approx(0.01)
    assert paired["p_not_ahead"] == 0.0
    # unpaired, the two intervals overlap almost entirely
    a, b = metrics.bootstrap_interval(mine), metrics.bootstrap_interval(theirs)
    assert a[0] < b[1]


# ----------------------------------------------------------------------------- failures

def test_auroc_of_a_constructed_case():
    # positives score 0.35 and 0.8, negatives 0.1 and 0.4: 3 of the 4 pairs are ordered right
    assert metrics.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert metrics.auroc([1, 2, 3], [0, 1, 1]) == 1.0
    assert metrics.auroc([3, 2, 1], [0, 1, 1]) == 0.0
    assert metrics.auroc([5, 5, 5, 5], [0, 1, 0, 1]) == 0.5  # ties count a half
    assert metrics.auroc([1, 2], [1, 1]) is None  # one class only


def test_failure_auroc_points_low_confidence_at_failures():
    iou = [0.2, 0.5, 0.9, 0.8, 0.7]  # two failures (< 0.65)
    assert metrics.failure_auroc([0.1, 0.3, 0.9, 0.8, 0.7], iou) == 1.0
    # the failure at 0.5 is more confident than the success at 0.7: 5 of the 6 pairs right
    assert metrics.failure_auroc([0.1, 0.75, 0.9, 0.8, 0.7], iou) == pytest.approx(5 / 6)
    result = metrics.failure_auroc_interval([0.1, 0.3, 0.9, 0.8, 0.7], iou)
    assert result["auroc"] == 1.0 and result["low"] == 1.0 and result["failures"] == 2


def test_review_curve_sets_aside_the_least_confident():
    iou = np.array([0.1, 0.9, 0.8, 0.7, 0.95, 0.6, 0.85, 0.9, 0.75, 0.8])
    confidence = np.array([0.0, 0.9, 0.8, 0.7, 0.95, 0.1, 0.85, 0.9, 0.75, 0.8])
    rows = {r["set_aside"]: r for r in metrics.review_curve(confidence, iou)}
    assert rows[0.0]["iou"] == pytest.approx(iou.mean())
    assert rows[0.0]["threshold_jaccard"] == pytest.approx(np.where(iou >= 0.65, iou, 0).mean())
    # 10% of 10 images: the one at confidence 0 (IoU 0.1) goes; 20%: the 0.6 one too
    assert rows[0.1]["iou"] == pytest.approx(np.delete(iou, 0).mean())
    assert rows[0.2]["threshold_jaccard"] == pytest.approx(np.delete(iou, [0, 5]).mean())
    assert rows[0.2]["failures_set_aside"] == 2 == rows[0.2]["failures"]
    assert rows[0.3]["images_kept"] == 7


def test_calibration_level_sets_aside_90_percent_of_the_failures():
    # 10 failures at confidences 0.1 .. 1.0 (step 0.1) and successes at 0.95 and 0.99
    conf = np.r_[np.arange(1, 11) / 10, 0.95, 0.99]
    iou = np.r_[np.full(10, 0.3), 0.9, 0.9]
    level = metrics.calibration_level(conf, iou)
    # the 9th failure sits at 0.9, the next confidence above it is 0.95: midway, 0.925
    assert level == pytest.approx(0.925)
    assert (conf[:10] < level).sum() == 9
    assert metrics.calibration_level([0.5, 0.6], [0.9, 0.8]) is None  # no failure


# ----------------------------------------------------------------------------- confidence

def test_soft_iou_of_a_map_with_its_own_mask():
    # p = 1, 0.5, 0, 0.25 -> mask 1, 1, 0, 0: min sums to 1.5, max to 2.25
    assert metrics.soft_iou(np.array([1.0, 0.5, 0.0, 0.25])) == pytest.approx(1.5 / 2.25)
    assert metrics.soft_iou(np.zeros((4, 4))) == 1.0  # no lesion, no doubt
    assert metrics.soft_iou(np.eye(4)) == 1.0          # certain everywhere


def test_judge_gives_intervals_auroc_and_the_review_curve():
    rows = [{"iou": v, "dice": v, "threshold_jaccard": v if v >= 0.65 else 0.0,
             "hd95": 10 * (1 - v), "nsd": v, "confidence": v}
            for v in np.linspace(0.3, 0.95, 20)]
    judged = metrics.judge(rows)
    assert judged["intervals"]["iou"]["mean"] == pytest.approx(np.mean([r["iou"] for r in rows]))
    assert judged["intervals"]["iou"]["low"] < judged["intervals"]["iou"]["mean"]
    assert set(judged["intervals"]) == {"iou", "dice", "threshold_jaccard", "hd95", "nsd"}
    assert judged["confidence"]["auroc"] == 1.0  # confidence equal to IoU: a perfect ranking
    assert judged["confidence"]["name"] == metrics.CONFIDENCE
    assert [r["set_aside"] for r in judged["review_curve"]] == list(metrics.REVIEW_FRACTIONS)


def test_soft_iou_largest_counts_a_second_region_as_doubt():
    prob = np.zeros((6, 6), np.float32)
    prob[0:2, 0:2] = 1.0   # 4 certain pixels: the largest region
    prob[4:6, 5] = 0.9     # a second region of 2 pixels
    # soft IoU with its own mask: min sums to 4 + 1.8, max to 6; with the largest region: the
    # second region only adds to the maximum, 4 / (4 + 1.8)
    assert metrics.soft_iou(prob) == pytest.approx(5.8 / 6)
    assert metrics.soft_iou_largest(prob) == pytest.approx(4 / 5.8)


# ----------------------------------------------------------------------------- boundaries
#
# Boundary pixels: lesion pixels with a 4-neighbour that is background or beyond the image's
# edge. Distances are Euclidean, in pixels, between pixel centres.

def pixel(shape, *where):
    mask = np.zeros(shape, bool)
    for r, c in where:
        mask[r, c] = True
    return mask


def boundary_scores(pred, truth, tolerance=metrics.NSD_TOLERANCE):
    pair = metrics.MaskPair(pred, truth)
    return metrics.hd95(pair), metrics.nsd(pair, tolerance)


def test_two_single_pixels_three_by_four_apart_are_five_pixels_apart():
    pred, truth = pixel((10, 10), (0, 0)), pixel((10, 10), (3, 4))
    assert boundary_scores(pred, truth, 5.0) == pytest.approx((5.0, 1.0))  # within 5 px
    assert boundary_scores(pred, truth, 4.0) == pytest.approx((5.0, 0.0))  # not within 4


def test_a_square_shifted_by_one_column():
    # 5x5 squares, columns 2-6 against 3-7: each outline has 16 pixels; on each, the 8 pixels
    # of the top and bottom rows that the other square shares are 0 away, the two corners
    # that stick out and the 6 pixels of the side columns 1 away
    pred = box((10, 10), slice(2, 7), slice(2, 7))
    truth = box((10, 10), slice(2, 7), slice(3, 8))
    assert metrics.boundary_points(pred).shape == (16, 2)
    assert sorted(metrics.MaskPair(pred, truth).distances()[0]) == [0] * 8 + [1] * 8
    # 95th percentile of eight 0s and eight 1s: 1; half the outline within 0.5 px, all within 1
    assert boundary_scores(pred, truth, 0.5) == pytest.approx((1.0, 0.5))
    assert boundary_scores(pred, truth, 1.0) == pytest.approx((1.0, 1.0))


def test_hd95_sets_one_stray_pixel_aside_where_the_hausdorff_distance_would_not():
    # the same 5x5 square (rows and columns 2-6), the truth with one more pixel 3 rows below
    # its bottom row: predicted outline 16 pixels all on the true outline; the true outline 17
    # pixels, 16 at 0 and one at 3. 95th percentile of 17 values (linear interpolation):
    # rank 0.95 * 16 = 15.2, between the 16th value (0) and the 17th (3): 0.2 * 3 = 0.6
    pred = box((12, 12), slice(2, 7), slice(2, 7))
    truth = pred.copy()
    truth[9, 4] = True
    hd, nsd = boundary_scores(pred, truth, 2.0)
    assert hd == pytest.approx(0.6)
    assert nsd == pytest.approx((16 + 16) / (16 + 17))  # the stray pixel is beyond 2 px


@pytest.mark.parametrize("pred_empty, truth_empty, expected", [
    (True, True, (0.0, 1.0)),     # nothing to find, nothing found: perfect
    (True, False, (10.0, 0.0)),   # a lesion missed: the image's diagonal, hypot(6, 8) = 10
    (False, True, (10.0, 0.0)),   # a lesion where there is none: the same
])
def test_empty_masks_have_defined_finite_values(pred_empty, truth_empty, expected):
    lesion = box((6, 8), slice(1, 3), slice(1, 4))
    empty = np.zeros((6, 8), bool)
    got = boundary_scores(empty if pred_empty else lesion, empty if truth_empty else lesion)
    assert got == pytest.approx(expected)
    assert all(np.isfinite(got))


def test_a_lesion_cut_by_the_frame_has_its_outline_along_the_frame():
    # a full 4x4 mask: the 12 pixels of its outer ring lie on the image's edge, so they are
    # outline (beyond the edge counts as background); the 4 inner pixels are not
    full = np.ones((4, 4), bool)
    points = {tuple(p) for p in metrics.boundary_points(full).astype(int)}
    assert len(points) == 12 and not points & {(1, 1), (1, 2), (2, 1), (2, 2)}


def test_the_bounding_box_gives_the_outline_of_the_whole_image():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = np.zeros((30, 40), bool)
        r, c = rng.integers(0, 30), rng.integers(0, 40)
        mask[r:r + rng.integers(1, 12), c:c + rng.integers(1, 12)] = True
        mask &= rng.random(mask.shape) < 0.9  # holes and ragged edges
        if not mask.any():
            continue
        padded = np.pad(mask, 1)  # beyond the edge: background
        inner = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] \
            & padded[1:-1, :-2] & padded[1:-1, 2:]
        expected = sorted(zip(*np.nonzero(mask & ~inner)))
        assert sorted(map(tuple, metrics.boundary_points(mask).astype(int))) == expected


# ----------------------------------------------------------------------------- the registry

def test_every_registry_metric_is_scored_once_per_image_and_the_counts_ones_as_before():
    pred = box((10, 10), slice(2, 7), slice(2, 7))
    truth = box((10, 10), slice(2, 7), slice(3, 8))
    got = metrics.image_scores(pred, truth)
    assert list(got) == metrics.names()
    assert {k: got[k] for k in metrics.SCORE_NAMES} == metrics.scores(
        *metrics.confusion(pred, truth))
    assert (got["hd95"], got["nsd"]) == pytest.approx(boundary_scores(pred, truth))
    assert metrics.names(logged=True) == ["iou", "dice", "threshold_jaccard"]
    assert {m.name: m.higher_is_better for m in metrics.REGISTRY}["hd95"] is False


def test_score_at_original_brings_the_map_to_the_masks_size_before_the_cut():
    # a 2x2 map whose left column is lesion, scored against a 4x6 truth of its left half
    prob = np.array([[0.9, 0.1], [0.9, 0.1]], np.float32)
    truth = box((4, 6), slice(None), slice(0, 3))
    pred, scores = metrics.score_at_original(prob, truth, 0.5)
    assert pred.shape == (4, 6) and scores["iou"] == 1.0 and scores["hd95"] == 0.0


def test_resampled_aurocs_equal_the_auroc_of_each_resample():
    rng = np.random.default_rng(1)
    confidence = np.round(rng.random(25), 1)  # ties, counted a half
    iou = np.clip(0.8 * confidence + rng.normal(0, 0.2, 25), 0, 1)
    each = [metrics.failure_auroc(confidence[i], iou[i])
            for i in metrics._resample_indices(25, 300, 0)]
    together = metrics.resampled_failure_aurocs(confidence, iou, 300, 0)
    assert np.allclose([np.nan if v is None else v for v in each], together, equal_nan=True)
    assert np.isnan(together).sum() == sum(v is None for v in each)
