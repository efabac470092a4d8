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
