"""benchmarks/compare_recipes.py: the results tables from per-image scores, on known numbers."""
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import compare_recipes  # noqa: E402
import metrics  # noqa: E402


def write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_table_pairs_each_recipe_with_the_plain_loop_fold_by_fold(tmp_path, capsys):
    plain, recipe = tmp_path / "plain", tmp_path / "recipe"
    # plain loop: fold 0 images 0.5 and 0.7 (mean 0.6), fold 1 one image 0.4
    write_csv(plain / "plain_0.csv", [{"id": "a", "iou": 0.5, "threshold_jaccard": 0.0},
                                      {"id": "b", "iou": 0.7, "threshold_jaccard": 0.7}])
    write_csv(plain / "plain_1.csv", [{"id": "c", "iou": 0.4, "threshold_jaccard": 0.0}])
    write_csv(plain / "plain_test.csv", [{"id": "t", "iou": 0.0, "threshold_jaccard": 0.0}])
    for fold, minutes in ((0, 3.0), (1, 4.0)):
        (plain / f"plain_{fold}.json").write_text(json.dumps(
            {"minutes": minutes, "images_per_s": 5.0}))
    # recipe: fold 0 0.6 and 0.8 (mean 0.7), fold 1 0.6; with post-processing +0.1 on fold 0
    rows = [{"fold": 0, "id": "a", "tta": "none", "postprocess": "False", "iou": 0.6,
             "threshold_jaccard": 0.0},
            {"fold": 0, "id": "b", "tta": "none", "postprocess": "False", "iou": 0.8,
             "threshold_jaccard": 0.8},
            {"fold": 1, "id": "c", "tta": "none", "postprocess": "False", "iou": 0.6,
             "threshold_jaccard": 0.0},
            {"fold": 0, "id": "a", "tta": "none", "postprocess": "True", "iou": 0.7,
             "threshold_jaccard": 0.7},
            {"fold": 0, "id": "b", "tta": "none", "postprocess": "True", "iou": 0.9,
             "threshold_jaccard": 0.9},
            {"fold": 1, "id": "c", "tta": "none", "postprocess": "True", "iou": 0.6,
             "threshold_jaccard": 0.0}]
    write_csv(recipe / "cross_validation" / "per_image.csv", rows)
    for fold, seconds in ((0, (60, 120)), (1, (90, 90))):
        write_csv(recipe / f"fpn_r_fold{fold}_log.csv", [{"epoch": e + 1, "seconds": s}
                                                         for e, s in enumerate(seconds)])
    (recipe / "cross_validation" / "summary.json").write_text(json.dumps(
        {"checkpoints": {"0": {"train_pairs": 180}, "1": {"train_pairs": 180}}}))

    compare_recipes.main(["--plain", str(plain), str(recipe)])
    lines = capsys.readouterr().out.splitlines()
    # plain: pooled (0.5+0.7+0.4)/3, fold means 0.6 and 0.4 (std 0.1); TJ (0+0.7+0)/3, fold
    # means 0.35 and 0
    assert "| 0.533 ± 0.100 | 0.233 ± 0.175 | 3.50 | 5.0 |" in lines[2]
    # recipe: pooled 2.0/3, fold means 0.7 and 0.6; paired +0.1 and +0.2; 3 minutes;
    # 180 images x 2 epochs in 180 s
    # TJ fold means 0.4 and 0 (paired +0.05 and 0)
    # per image, recipe - plain: IoU +0.1, +0.1, +0.2; resampling 3 images, the mean is +0.1
    # with chance 8/27 and +0.2 with 1/27 (both above 2.5%): the interval is [+0.1, +0.2].
    # Thresholded Jaccard 0, +0.1, 0: [0, +0.1] the same way
    assert lines[3] == ("| recipe | 0.667 ± 0.050 (+0.150 ± 0.050; [+0.100, +0.200]) | "
                        "0.267 ± 0.200 (+0.025 ± 0.025; [+0.000, +0.100]) | 3.00 | 2.0 |")
    assert lines[4].startswith("| recipe, tta none, post-processing True | 0.733 ± 0.100 "
                               "(+0.200 ± 0.000; [+0.200, +0.200])")
    gain = [line for line in lines if "over no TTA" in line]
    # post-processing over none, per image: IoU +0.1, +0.1, 0; thresholded Jaccard +0.7, +0.1, 0
    assert gain == ["recipe, tta none, post-processing True: over no TTA/post-processing, IoU "
                    "+0.050 ± 0.050, thresholded Jaccard +0.200 ± 0.200 (paired over folds); "
                    "95% paired bootstrap over images: IoU [+0.000, +0.100], thresholded "
                    "Jaccard [+0.000, +0.700]"]


def test_training_pairs_come_from_the_folds_when_the_summary_has_none():
    rows = [{"fold": f, "id": i, "tta": "none", "postprocess": "False"}
            for f, i in ((0, "a"), (0, "b"), (1, "c"), (2, "d"))]
    # four pooled images: fold 0 trained on the other two, folds 1 and 2 on three
    assert compare_recipes.train_pairs({}, rows) == {0: 2, 1: 3, 2: 3}
    assert compare_recipes.train_pairs({"checkpoints": {"0": {"train_pairs": 7}}}, rows) == {0: 7}


def test_table_refuses_runs_that_cover_different_folds(tmp_path):
    plain, recipe = tmp_path / "plain", tmp_path / "recipe"
    for fold in (0, 1):
        write_csv(plain / f"plain_{fold}.csv", [{"id": "a", "iou": 0.5,
                                                  "threshold_jaccard": 0.5}])
    write_csv(recipe / "cross_validation" / "per_image.csv",
              [{"fold": 0, "id": "a", "tta": "none", "postprocess": "False", "iou": 0.6,
                "threshold_jaccard": 0.6}])  # fold 1 not trained yet
    with pytest.raises(SystemExit, match="different folds"):
        compare_recipes.main(["--plain", str(plain), str(recipe)])


def recipe_folder(folder, ious):
    """Fold models' out-of-fold scores: images a, b in fold 0 and c in fold 1 at `ious`, one
    minute an epoch, two epochs a fold."""
    write_csv(folder / "cross_validation" / "per_image.csv", [
        {"fold": fold, "id": i, "tta": "none", "postprocess": "False", "iou": iou,
         "threshold_jaccard": iou if iou >= 0.65 else 0.0}
        for (fold, i), iou in zip(((0, "a"), (0, "b"), (1, "c")), ious)])
    for fold in (0, 1):
        write_csv(folder / f"unet_r_fold{fold}_log.csv", [{"epoch": e, "seconds": 60}
                                                           for e in (1, 2)])
    (folder / "cross_validation" / "summary.json").write_text(json.dumps(
        {"checkpoints": {"0": {"train_pairs": 60}, "1": {"train_pairs": 60}}}))


def test_table_pairs_each_folder_with_a_reference_recipe_fold_by_fold(tmp_path, capsys):
    reference, other = tmp_path / "fpn", tmp_path / "unet"
    recipe_folder(reference, (0.5, 0.7, 0.4))
    recipe_folder(other, (0.6, 0.8, 0.6))
    compare_recipes.main(["--reference", str(reference), str(other)])
    lines = capsys.readouterr().out.splitlines()
    # the reference alone: pooled 0.533, fold means 0.6 and 0.4; 2 minutes, 120 images in 120 s
    assert lines[2].startswith("| fpn | 0.533 ± 0.100 | 0.233 ± 0.175 | 2.00 | 1.0 |")
    # the other, paired with it fold by fold (+0.1, +0.2) and image by image (+0.1, +0.1, +0.2)
    assert lines[3].startswith("| unet | 0.667 ± 0.050 (+0.150 ± 0.050; [+0.100, +0.200]) | ")
    with pytest.raises(SystemExit):  # one baseline: --plain or --reference, not both
        compare_recipes.main(["--reference", str(reference), "--plain", str(tmp_path),
                              str(other)])


def test_more_draws_average_each_image_over_the_draws_before_pairing(tmp_path, capsys):
    for name, ious in (("fpn", (0.5, 0.7, 0.4)), ("fpn_s7", (0.7, 0.7, 0.6)),
                       ("unet", (0.6, 0.8, 0.6)), ("unet_s7", (0.8, 0.6, 0.8))):
        recipe_folder(tmp_path / name, ious)
    compare_recipes.main(["--reference", str(tmp_path / "fpn"), str(tmp_path / "unet"),
                          "--more-draws", "_s7"])
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index("| --- | --- | --- | --- |") + 1:]
    # the reference averaged: IoU a 0.6, b 0.7, c 0.5; thresholded (0 below 0.65) a 0.35, b 0.7,
    # c 0 (mean 0.35)
    assert table[0] == "| fpn | 0.600 | 0.350 | +0.000 / +0.000 |"
    # unet averaged: IoU 0.7 each, paired per image +0.1, 0.0, +0.2; thresholded 0.4 each
    # (+0.05, -0.3, +0.4: mean +0.05); in each draw alone thresholded Jaccard 0.267 - 0.233 and
    # 0.533 - 0.467
    assert table[1].startswith("| unet | 0.700 (+0.100; [+0.000, +0.200]) | 0.400 (+0.050; [")
    assert table[1].endswith("| +0.033 / +0.067 |")
    # a third draw: the reference 0.9, 0.7, 0.5 and unet 0.9, 0.7, 0.8 make the three-draw
    # means a 0.7 against 0.767, b 0.7 against 0.7, c 0.5 against 0.733
    recipe_folder(tmp_path / "fpn_s11", (0.9, 0.7, 0.5))
    recipe_folder(tmp_path / "unet_s11", (0.9, 0.7, 0.8))
    compare_recipes.main(["--reference", str(tmp_path / "fpn"), str(tmp_path / "unet"),
                          "--more-draws", "_s7", "_s11"])
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index("| --- | --- | --- | --- |") + 1:]
    assert table[0].startswith("| fpn | 0.633 | ")
    assert table[1].startswith("| unet | 0.733 (+0.100; [")
    assert table[1].count(" / ") == 2
    (tmp_path / "unet_s7" / "cross_validation" / "per_image.csv").write_text(
        "fold,id,tta,postprocess,iou,threshold_jaccard\n0,a,none,False,0.8,0.8\n")
    with pytest.raises(SystemExit, match="did not score the same images"):
        compare_recipes.main(["--reference", str(tmp_path / "fpn"), str(tmp_path / "unet"),
                              "--more-draws", "_s7"])


# ----------------------------------------------------------------------------- confidence study

def test_the_study_reads_the_identity_view_for_the_plain_candidates():
    import confidence_study

    # the identity view is certain, the three flipped views doubt
    certain = np.array([[1.0, 0.0], [0.0, 0.0]])
    doubtful = np.array([[0.6, 0.4], [0.0, 0.0]])
    c = confidence_study.candidates(np.stack([certain, doubtful, doubtful, doubtful]))
    assert c["soft_iou"] == 1.0 and c["soft_iou_largest"] == 1.0  # the identity view only
    # the views' pixelwise min sums to 0.6, their max to 1 + 0.4
    assert c["view_agreement"] == pytest.approx(0.6 / 1.4)
    assert c["mask_agreement"] == pytest.approx(1.0)  # every view calls the same pixel lesion
    # the mean of the views: 0.7 and 0.3; its mask the first pixel: min 0.7, max 1 + 0.3
    assert c["soft_iou_flips"] == pytest.approx(0.7 / 1.3)
    assert c["soft_iou_x_agreement"] == pytest.approx(c["soft_iou"] * c["view_agreement"])
    assert len(c) == 8 and metrics.CONFIDENCE in c


def test_agreement_of_views_that_disagree():
    import confidence_study

    a = np.array([[1.0, 1.0, 0.0, 0.0]])
    b = np.array([[1.0, 0.0, 0.0, 0.0]])
    assert confidence_study.soft_agreement([a, b]) == pytest.approx(0.5)
    assert confidence_study.mask_agreement([a, b]) == pytest.approx(0.5)
    assert confidence_study.soft_agreement([a, a]) == 1.0
