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


def test_agreement_of_views_that_disagree():
    a = np.array([[1.0, 1.0, 0.0, 0.0]])
    b = np.array([[1.0, 0.0, 0.0, 0.0]])
    assert metrics.soft_agreement([a, b]) == pytest.approx(0.5)
    assert metrics.mask_agreement([a, b]) == pytest.approx(0.5)
    assert metrics.soft_agreement([a, a]) == 1.0


def test_candidates_read_the_identity_views_for_the_baseline():
    # one member, 4 flip views: the identity view is certain, the other three doubt
    certain = np.array([[1.0, 0.0], [0.0, 0.0]])
    doubtful = np.array([[0.6, 0.4], [0.0, 0.0]])
    maps = np.stack([certain, doubtful, doubtful, doubtful])
    c = metrics.confidence_candidates(maps)
    assert c["soft_iou"] == 1.0  # the baseline sees the identity view only
    assert c["view_agreement"] == pytest.approx(0.6 / 1.4)
    assert c["soft_iou_x_agreement"] == pytest.approx(c["soft_iou"] * c["view_agreement"])
    assert set(c) == set(metrics.CANDIDATES) and metrics.CONFIDENCE in c


def test_judge_gives_intervals_auroc_and_the_review_curve():
    rows = [{"iou": v, "dice": v, "threshold_jaccard": v if v >= 0.65 else 0.0,
             **{f"confidence_{n}": v for n in metrics.CANDIDATES}}
            for v in np.linspace(0.3, 0.95, 20)]
    judged = metrics.judge(rows)
    assert judged["intervals"]["iou"]["mean"] == pytest.approx(np.mean([r["iou"] for r in rows]))
    assert judged["intervals"]["iou"]["low"] < judged["intervals"]["iou"]["mean"]
    assert judged["confidence"]["auroc"] == 1.0  # confidence equal to IoU: a perfect ranking
    assert [r["set_aside"] for r in judged["review_curve"]] == list(metrics.REVIEW_FRACTIONS)
    assert judged["confidence"]["candidates"]["view_agreement"]["vs_soft_iou"]["mean"] == 0.0


def test_soft_iou_largest_counts_a_second_region_as_doubt():
    prob = np.zeros((6, 6), np.float32)
    prob[0:2, 0:2] = 1.0   # 4 certain pixels: the largest region
    prob[4:6, 5] = 0.9     # a second region of 2 pixels
    # soft IoU with its own mask: min sums to 4 + 1.8, max to 6; with the largest region: the
    # second region only adds to the maximum, 4 / (4 + 1.8)
    assert metrics.soft_iou(prob) == pytest.approx(5.8 / 6)
    assert metrics.soft_iou_largest(prob) == pytest.approx(4 / 5.8)
