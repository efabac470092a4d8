"""test_model.py: masks at the input's size, scores equal to the official ISIC scorer's, the
threshold analysis, and one-line errors. CPU only, generated images, an untrained tiny FPN."""
import csv
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import device as device_lib
from PIL import Image

import demo_data
import evaluate
import model as model_lib
import load_dataset
import metrics
import preprocess
import test_model
import train_model
import checkpoint as ckpt_lib
import predict
import settings as settings_lib
from conftest import record_of  # noqa: E402

CPU = device_lib.Compute(torch.device("cpu"))  # float32, as the tests' figures

REPO = Path(__file__).resolve().parents[1]

NET_SIZE = (64, 64)
SCORER_KEYS = {"iou": "jaccard", "dice": "dice", "threshold_jaccard": "threshold_jaccard",
               "sensitivity": "sensitivity", "specificity": "specificity", "accuracy": "accuracy"}


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """40 generated pairs of varied sizes, split as train_model.py would draw and save it."""
    root = tmp_path_factory.mktemp("data")
    demo_data.make_demo(root, 40, 0)
    split_file = load_dataset.work_dir(root) / "split.json"
    splits = load_dataset.split_pairs(load_dataset.scan(root), seed=42, valid_fraction=0.1,
                                      test_fraction=0.1, split_file=split_file)
    assert len(splits["test"]) == 4 and len(splits["valid"]) == 4
    return root, split_file, splits


def write_checkpoint(path, root, split_file, demo_flag, calibrate_on=(), size=NET_SIZE, seed=0):
    """A checkpoint of an untrained resnet18 FPN; with calibrate_on, the output bias is shifted so
    that half the pixels of those images are lesion (a mask with both values, not a blank one)."""
    torch.manual_seed(seed)
    model = model_lib.build_model("resnet18", None, 5).eval()
    if calibrate_on:
        batch = torch.cat([preprocess.eval_input(p, size)[0] for p in calibrate_on])
        with torch.inference_mode():
            median = model(batch).median()
        model.segmentation_head[0].bias.data -= median
    settings = {"encoder": "resnet18", "encoder_depth": 5, "image_size": size,
                "threshold": 0.5, "demo": demo_flag, "data": str(root),
                "split_file": str(split_file)}
    ckpt_lib.save_checkpoint(record_of(model, settings, 1, 0.5), path)
    return path


@pytest.fixture(scope="module")
def ckpt(demo, tmp_path_factory):
    root, split_file, splits = demo
    images = [p.image for p in splits["valid"] + splits["test"]]
    return write_checkpoint(tmp_path_factory.mktemp("model") / "demo_fpn_resnet18.pth", root,
                            split_file, True, images)


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory):
    """Not a demo model, and its data folder does not exist: --image must not need it."""
    folder = tmp_path_factory.mktemp("plain")
    return write_checkpoint(folder / "fpn_resnet18.pth", folder / "no_data", folder / "split.json",
                            False)


def darkness(model, images, device, tta="none"):
    """Stand-in for the network where a sensible mask is needed: the darker than average pixels of
    each image (the generated lesions are dark), as probabilities at network size."""
    gray = images.mean(1)
    z = (gray - gray.mean((1, 2), keepdim=True)) / gray.std((1, 2), keepdim=True)
    return torch.sigmoid(-3 * z - 1).cpu().numpy()


def darkness_module(monkeypatch):
    """`darkness` in place of the network of every Predictor (ImageProbability's one seam
    between the input at network size and the probability there)."""
    monkeypatch.setattr(predict.ImageProbability, "network_probability",
                        lambda self, index, x: torch.from_numpy(darkness(None, x.float(), None)))


def run_main(argv, capsys):
    assert test_model.main([str(a) for a in argv]) == 0
    return capsys.readouterr()


def mask_values(path):
    with Image.open(path) as img:
        return img.mode, img.size, set(np.unique(np.asarray(img)).tolist())


# ----------------------------------------------------------------------------- --image

def test_image_masks_have_the_input_size_and_only_0_255(tmp_path, plain_ckpt, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (157, 203, 3), np.uint8)).save(folder / "wide.png")
    Image.fromarray(rng.integers(0, 255, (300, 41), np.uint8)).save(folder / "gray.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 120 wide x 90 high, shown rotated: 90 wide x 120 high
    Image.fromarray(rng.integers(0, 255, (90, 120, 3), np.uint8)).save(folder / "turned.jpg",
                                                                       exif=exif)
    out = tmp_path / "out"
    run_main(["--checkpoint", plain_ckpt, "--image", folder, "--out", out], capsys)
    expected = {"wide": (203, 157), "gray": (41, 300), "turned": (90, 120)}  # (width, height)
    for stem, size in expected.items():
        mode, got, values = mask_values(out / f"{stem}_segmentation.png")
        assert (mode, got) == ("L", size)
        assert values <= {0, 255}
        assert (out / f"{stem}_overlay.png").stat().st_size > 0
    assert sorted(p.name for p in out.glob("*_segmentation.png")) == sorted(
        f"{s}_segmentation.png" for s in expected)


def test_image_skips_unreadable_files_and_scores_a_mask_beside_it(tmp_path, plain_ckpt, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    image = np.full((70, 90, 3), 200, np.uint8)
    Image.fromarray(image).save(folder / "ISIC_0000001.png")
    truth = np.zeros((70, 90), np.uint8)
    truth[20:50, 30:60] = 255
    Image.fromarray(truth).save(folder / "ISIC_0000001_segmentation.png")
    good = folder / "ok.jpg"
    Image.fromarray(image).save(good)
    (folder / "broken.jpg").write_bytes(good.read_bytes()[:200])  # truncated JPEG
    out = tmp_path / "out"
    result = run_main(["--checkpoint", plain_ckpt, "--image", folder, "--out", out], capsys)

    assert "broken.jpg" in result.err and "Traceback" not in result.err
    assert sorted(p.name for p in out.glob("*_segmentation.png")) == [
        "ISIC_0000001_segmentation.png", "ok_segmentation.png"]  # the true mask is not an input
    pred = np.asarray(Image.open(out / "ISIC_0000001_segmentation.png")) > 128
    expected = metrics.scores(*metrics.confusion(pred, truth > 128))
    line = next(s for s in result.out.splitlines() if "ISIC_0000001.png" in s)
    iou, dice = map(float, re.search(r"IoU ([\d.]+), Dice ([\d.]+)", line).groups())
    assert iou == pytest.approx(expected["iou"], abs=5e-5)
    assert dice == pytest.approx(expected["dice"], abs=5e-5)


# ----------------------------------------------------------------------------- default run

def test_default_run_segments_a_random_test_image(tmp_path, demo, ckpt, capsys):
    _, _, splits = demo
    out = tmp_path / "pred"
    result = run_main(["--checkpoint", ckpt, "--seed", 3, "--out", out], capsys)
    pair = random.Random(3).choice(splits["test"])
    assert "demo data" in result.out
    mode, size, values = mask_values(out / f"{pair.id}_segmentation.png")
    with Image.open(pair.image) as img:
        assert (mode, size) == ("L", img.size)
    assert values <= {0, 255} and (out / f"{pair.id}_overlay.png").is_file()
    pred = np.asarray(Image.open(out / f"{pair.id}_segmentation.png")) > 128
    truth = np.asarray(Image.open(pair.mask)) > 128
    expected = metrics.scores(*metrics.confusion(pred, truth))
    iou, dice = map(float, re.search(r"IoU ([\d.]+), Dice ([\d.]+)", result.out).groups())
    assert (iou, dice) == (round(expected["iou"], 4), round(expected["dice"], 4))


def test_predict_gives_probabilities_at_the_original_size(demo, ckpt):
    _, _, splits = demo
    model, record = predict.load_model(ckpt, CPU)
    assert not model.training and record["settings"]["demo"] is True
    image = splits["test"][0].image
    prob = predict.predict(model, record, image, CPU)
    with Image.open(image) as img:
        assert prob.shape == (img.height, img.width)
    assert prob.dtype == np.float32 and 0.0 <= prob.min() and prob.max() <= 1.0


# ----------------------------------------------------------------------------- --evaluate

@pytest.mark.parametrize("network", ["untrained", "darkness"])
def test_evaluate_means_equal_the_official_scorer(tmp_path, demo, ckpt, capsys, monkeypatch,
                                                  network):
    from isic_challenge_scoring.segmentation import SegmentationScore

    _, _, splits = demo
    if network == "darkness":
        darkness_module(monkeypatch)
    out = tmp_path / "eval"
    (out / "masks").mkdir(parents=True)
    (out / "masks" / "ISIC_9999999_segmentation.png").write_bytes(b"stale")  # an earlier run's
    run_main(["--checkpoint", ckpt, "--evaluate", "--out", out, "--workers", 2,
              "--batch-size", 3], capsys)
    truth_dir = tmp_path / "truth"
    truth_dir.mkdir()
    for pair in splits["test"]:
        shutil.copy(pair.mask, truth_dir)

    written = sorted(p.name for p in (out / "masks").iterdir())
    assert written == sorted(f"{p.id}_segmentation.png" for p in splits["test"])
    official = SegmentationScore.from_dir(truth_dir, out / "masks").macro_average
    summary = json.loads((out / "summary.json").read_text())
    assert {"iou", "dice", "threshold_jaccard", "sensitivity", "specificity", "accuracy",
            "images"} <= set(summary)
    assert summary["images"] == 4
    for ours, theirs in SCORER_KEYS.items():
        assert summary[ours] == pytest.approx(float(official[theirs]), abs=1e-6), ours
    assert 0.0 < summary["iou"] < 1.0  # masks with both values: the comparison means something
    if network == "darkness":
        assert 0.0 < summary["threshold_jaccard"] < summary["iou"]  # some images under 0.65

    with open(out / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == [p.id for p in splits["test"]]
    assert np.mean([float(r["iou"]) for r in rows]) == pytest.approx(summary["iou"], abs=1e-5)
    for row, pair in zip(rows, splits["test"]):
        truth = np.asarray(Image.open(pair.mask)) > 128
        assert float(row["true_area"]) == pytest.approx(truth.mean(), abs=1e-6)


def test_evaluate_refuses_an_empty_test_split(tmp_path, capsys):
    root = tmp_path / "two"
    demo_data.make_demo(root, 2, 0)  # too few pairs to draw a test split from
    path = write_checkpoint(tmp_path / "m.pth", root, load_dataset.work_dir(root) / "split.json",
                            True)
    with pytest.raises(SystemExit) as exc:
        test_model.main(["--checkpoint", str(path), "--evaluate", "--out", str(tmp_path / "o")])
    assert "test split" in str(exc.value.code) and "empty" in str(exc.value.code)


# ----------------------------------------------------------------------------- threshold analysis

def test_threshold_counts_equal_confusion_at_every_threshold():
    rng = np.random.default_rng(0)
    prob = rng.random((37, 53)).astype(np.float32)
    prob.flat[:19] = np.float32(test_model.THRESHOLDS)  # exactly on a threshold: lesion
    truth = rng.random((37, 53)) < 0.3
    counts = evaluate.threshold_counts(prob, truth, test_model.THRESHOLDS)
    for i, t in enumerate(test_model.THRESHOLDS):
        assert tuple(counts[i]) == metrics.confusion(prob >= np.float32(t), truth)


def test_threshold_analysis_best_is_the_argmax_and_agrees_with_evaluate(tmp_path, demo, ckpt,
                                                                        capsys, monkeypatch):
    _, _, splits = demo
    darkness_module(monkeypatch)
    out = tmp_path / "analysis"
    result = run_main(["--checkpoint", ckpt, "--threshold-analysis", "--out", out,
                       "--workers", 0], capsys)
    with open(out / "threshold_curve.csv") as f:
        curve = list(csv.DictReader(f))
    assert [float(r["threshold"]) for r in curve] == list(test_model.THRESHOLDS)
    ious = [float(r["iou"]) for r in curve]
    best = float(re.search(r"best threshold on valid: ([\d.]+)", result.out).group(1))
    assert best == test_model.THRESHOLDS[int(np.argmax(ious))]
    assert len(set(ious)) > 3  # a curve, not a constant
    assert (out / "threshold_analysis.png").read_bytes()[:4] == b"\x89PNG"
    assert "replacing" not in result.out
    again = run_main(["--checkpoint", ckpt, "--threshold-analysis", "--out", out,
                      "--workers", 0], capsys)
    assert f"note: replacing 3 earlier result file(s) in {out}" in again.out.splitlines()

    with open(out / "probability_histogram.csv") as f:
        hist = list(csv.DictReader(f))
    pixels = sum(Image.open(p.image).width * Image.open(p.image).height for p in splits["valid"])
    lesion = sum(int((np.asarray(Image.open(p.mask)) > 128).sum()) for p in splits["valid"])
    assert sum(int(r["background_pixels"]) + int(r["lesion_pixels"]) for r in hist) == pixels
    assert sum(int(r["lesion_pixels"]) for r in hist) == lesion

    for threshold in ("0.3", "0.5"):  # same resolution and cut as --evaluate
        ev = tmp_path / f"valid_{threshold}"
        run_main(["--checkpoint", ckpt, "--evaluate", "--split", "valid", "--threshold", threshold,
                  "--out", ev, "--workers", 0], capsys)
        summary = json.loads((ev / "summary.json").read_text())
        row = next(r for r in curve if r["threshold"] == threshold)
        for name in metrics.SCORE_NAMES:
            assert float(row[name]) == pytest.approx(summary[name], abs=1e-6), (threshold, name)

    # the variants printed beside the sweep, at the threshold in use (0.5), are what --evaluate
    # reports with the same views and post-processing
    printed = dict(re.findall(r"^  (tta \S+, [^\n]+?)\s+IoU ([\d.]+)", result.out, re.M))
    assert len(printed) == 4
    for tta, post, name in (("none", [], "tta none, no post-processing"),
                            ("flips", ["--postprocess"], "tta flips, largest region filled")):
        ev = tmp_path / f"variant_{tta}"
        run_main(["--checkpoint", ckpt, "--evaluate", "--split", "valid", "--tta", tta, *post,
                  "--out", ev, "--workers", 0], capsys)
        summary = json.loads((ev / "summary.json").read_text())
        assert float(printed[name]) == pytest.approx(summary["iou"], abs=1e-4), name


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.2"])
def test_threshold_out_of_range_is_refused(tmp_path, plain_ckpt, value):
    with pytest.raises(SystemExit) as exc:
        test_model.main(["--checkpoint", str(plain_ckpt), "--threshold", value,
                         "--image", str(tmp_path)])
    assert "THRESHOLD" in str(exc.value.code)


def test_checkpoint_that_is_not_there_is_named(tmp_path):
    with pytest.raises(SystemExit) as exc:
        test_model.main(["--checkpoint", str(tmp_path / "gone.pth"), "--image", str(tmp_path)])
    message = str(exc.value.code)
    assert message.startswith(f"error: no checkpoint at {tmp_path / 'gone.pth'}: ")
    assert "python train_model.py" in message  # and what to do next


def test_no_checkpoint_in_model_dir_says_how_to_train(tmp_path):
    with pytest.raises(SystemExit) as exc:
        test_model.main(["--model-dir", str(tmp_path), "--image", str(tmp_path)])
    assert "python train_model.py" in str(exc.value.code) and "--demo" in str(exc.value.code)


def test_default_checkpoint_is_the_newest_best_model_on_real_data_before_a_demo_model(tmp_path):
    (tmp_path / "demo").mkdir()
    for age, name, demo_flag in ((300, "fpn_resnet18.pth", False), (200, "resnet34.pth", False),
                                 (100, "demo/demo_fpn_resnet18.pth", True),
                                 (0, "demo/x_last.pth", True)):
        torch.save({"version": ckpt_lib.CHECKPOINT_VERSION, "settings": {"demo": demo_flag}},
                   tmp_path / name)
        os.utime(tmp_path / name, (1e9 - age, 1e9 - age))
    path, why = predict.find_checkpoint(tmp_path)
    assert path == tmp_path / "resnet34.pth"
    assert why == (f"the newest of 3 best model(s) under {tmp_path}/, demo models left aside; "
                   f"--checkpoint picks another")
    (tmp_path / "fpn_resnet18.pth").unlink()
    (tmp_path / "resnet34.pth").unlink()
    assert predict.find_checkpoint(tmp_path) == (
        tmp_path / "demo" / "demo_fpn_resnet18.pth",
        f"the newest of 1 best model(s) under {tmp_path}/; --checkpoint picks another")


def test_an_image_in_an_images_folder_finds_its_truth_in_the_masks_folder(tmp_path):
    for folder in ("images", "masks"):
        (tmp_path / "ph2" / folder).mkdir(parents=True)
    image = tmp_path / "ph2" / "images" / "IMD003.png"
    image.write_bytes(b"x")
    mask = tmp_path / "ph2" / "masks" / "IMD003_segmentation.png"
    mask.write_bytes(b"x")
    assert test_model.image_files([image]) == [(image, mask, "IMD003")]
    alone = tmp_path / "elsewhere" / "IMD003.png"
    alone.parent.mkdir()
    alone.write_bytes(b"x")
    assert test_model.image_files([alone]) == [(alone, None, "IMD003")]


def _not_ours(path):
    torch.save({"model_state": {"w": torch.zeros(2)}, "epoch": 3}, path)


def _pickled_module(path):
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 1, 1)), path)


def _truncated(path, source):
    path.write_bytes(Path(source).read_bytes()[:100_000])


@pytest.mark.parametrize("kind, message", [
    ("not ours", "not written by train_model.py"),
    ("pickled module", "pickled"),
    ("truncated", "not a readable checkpoint"),
])
def test_bad_checkpoint_is_one_line_without_traceback(tmp_path, plain_ckpt, kind, message):
    bad = tmp_path / "bad.pth"
    if kind == "not ours":
        _not_ours(bad)
    elif kind == "pickled module":
        _pickled_module(bad)
    elif kind == "truncated":
        _truncated(bad, plain_ckpt)
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(image)
    proc = subprocess.run([sys.executable, str(REPO / "test_model.py"), "--checkpoint", str(bad),
                           "--image", str(image), "--out", str(tmp_path / "out")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and str(bad) in lines[0]
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- EXIF and outputs

FIXTURES = Path(__file__).parent / "fixtures" / "isic_sample"


def rotated_fixture_pair(folder, turned_mask):
    """A real fixture image cropped to 256x192 (h x w) and saved with EXIF orientation 6
    ("turn 90 degrees clockwise to view"), beside its mask: the mask has the shape of the image
    as stored (turned_mask False) or as a viewer shows it (True)."""
    image_path = sorted((FIXTURES / "images").iterdir())[0]
    pair_id = image_path.stem
    image = np.asarray(Image.open(image_path).convert("RGB"))[:, 32:224]  # 256 x 192
    mask = np.asarray(Image.open(FIXTURES / "masks" / f"{pair_id}_segmentation.png"))[:, 32:224]
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    if turned_mask:  # the viewer's picture is the crop: store it turned the other way
        stored, truth = np.rot90(image, 1), mask
    else:  # the pixels as stored are the crop, and the mask follows them
        stored, truth = image, mask
    Image.fromarray(np.ascontiguousarray(stored)).save(folder / "images" / f"{pair_id}.png",
                                                       exif=exif.tobytes())
    Image.fromarray(np.ascontiguousarray(truth)).save(
        folder / "masks" / f"{pair_id}_segmentation.png")
    return pair_id, image, truth


@pytest.mark.parametrize("turned_mask", [False, True])
def test_exif_rotated_photo_stays_aligned_with_its_mask(tmp_path, turned_mask):
    pair_id, image, truth = rotated_fixture_pair(tmp_path / "data", turned_mask)
    found = load_dataset.scan(tmp_path / "data")
    [pair] = found.splits["train"]
    assert pair.exif is turned_mask  # turned only when the mask has the turned shape
    assert [(p.name, why) for p, why in found.corrected] == [(
        pair.image.name, "EXIF orientation 6 applied: its mask has the turned shape"
        if turned_mask else "EXIF orientation 6 not applied: its mask has the shape of the "
                            "image as stored")]
    # the image the network gets is the crop the mask was drawn on, in both cases
    cache = preprocess.PreprocessCache(tmp_path / "cache", (256, 192))
    for source in (None, cache, cache):  # decoded, then built into the cache, then read back
        loaded, mask, _ = load_dataset.SegmentationDataset([pair], (256, 192), cache=source)[0]
        assert torch.allclose(loaded, preprocess.to_tensor(image), atol=1e-5)
        assert torch.equal(mask[0].bool(), torch.from_numpy(truth > 127))

    # --evaluate writes each mask at the shape of its ground truth, as the scorer needs
    model = model_lib.build_model("resnet18", None, 5).eval()
    ckpt = record_of(model, {"image_size": (64, 64)})
    out = tmp_path / "evaluation"
    predictor = predict.Predictor([(model, ckpt, "model.pth")], CPU)
    evaluate.evaluate_split(predictor, [pair], out, 0.5)
    written = np.asarray(Image.open(out / "masks" / f"{pair_id}_segmentation.png"))
    assert written.shape == truth.shape == (256, 192)


def test_image_without_a_mask_is_masked_in_the_orientation_a_viewer_shows(tmp_path, plain_ckpt):
    pair_id, _, _ = rotated_fixture_pair(tmp_path / "data", turned_mask=True)
    photo = tmp_path / "photo.png"
    shutil.copy(tmp_path / "data" / "images" / f"{pair_id}.png", photo)  # no mask beside it
    assert test_model.main(["--checkpoint", str(plain_ckpt), "--image", str(photo),
                            "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    written = np.asarray(Image.open(tmp_path / "out" / "photo_segmentation.png"))
    assert written.shape == (256, 192)  # stored 192 x 256, shown turned


def test_outputs_go_beside_the_checkpoint_and_same_stems_never_collide(tmp_path, demo, capsys):
    root, split_file, splits = demo
    run_dir = tmp_path / "runs" / "m2017"
    run_dir.mkdir(parents=True)
    path = write_checkpoint(run_dir / "fpn_resnet18.pth", root, split_file, False)
    cwd = os.getcwd()
    os.chdir(tmp_path)  # a ./Model here must stay untouched
    try:
        assert test_model.main(["--checkpoint", str(path), "--evaluate"]) == 0
        summary = json.loads((run_dir / "evaluation" / "fpn_resnet18" / "test" / "summary.json")
                             .read_text())
        assert summary["checkpoint"] == str(path) and summary["epoch"] == 1
        # the result names what it scored: data, split and size, and the model's own data
        assert summary["data"] == str(Path(root).resolve()) and summary["split"] == "test"
        assert summary["split_size"] == len(splits["test"])
        assert summary["models"] == [{"checkpoint": str(path), "arch": "FPN",
                                      "encoder": "resnet18",
                                      "image_size": list(NET_SIZE), "epoch": 1,
                                      "trained_on": str(Path(root).resolve())}]
        assert summary["threshold"] == 0.5 and summary["images"] == len(splits["test"])
        assert not (tmp_path / "Model").exists()

        a, b = tmp_path / "a", tmp_path / "b"
        for folder in (a, b):
            folder.mkdir()
            shutil.copy(splits["test"][0].image, folder / "IMD002.jpg")
        args = ["--checkpoint", str(path), "--image", str(a / "IMD002.jpg"),
                str(b / "IMD002.jpg"), "--device", "cpu"]
        assert test_model.main(args) == 0
        masks = sorted(p.name for p in (run_dir / "predictions" / "fpn_resnet18").glob("*_segmentation.png"))
        assert masks == ["a_IMD002_segmentation.png", "b_IMD002_segmentation.png"]
        capsys.readouterr()
        assert test_model.main(args) == 0
        assert "note: replacing 4 earlier result file(s)" in capsys.readouterr().out
    finally:
        os.chdir(cwd)


# ----------------------------------------------------------------------------- ensembles, TTA

def test_flips_tta_is_the_mean_of_the_flipped_predictions():
    torch.manual_seed(0)
    net = model_lib.build_model("resnet18", None, 5).eval()
    x, cpu = torch.randn(2, 3, 64, 96), torch.device("cpu")
    got = predict.tta_probabilities(net, x, cpu, "flips")
    views = [predict.probabilities(net, x.flip(dims), cpu).flip([d - 1 for d in dims])
             for dims in ([], [3], [2], [2, 3])]
    assert torch.allclose(got, sum(views) / 4, atol=1e-6)
    assert not torch.allclose(got, views[0], atol=1e-4)  # the views do differ
    with pytest.raises(settings_lib.SettingError, match="square"):
        predict.tta_probabilities(net, x, cpu, "flips+rot90")


def test_post_processing_keeps_the_largest_region_with_its_holes_filled():
    mask = np.zeros((40, 50), bool)
    mask[5:25, 5:30] = True
    mask[10:15, 10:15] = False  # a hole
    mask[30:35, 40:45] = True  # a second, smaller region
    expected = np.zeros_like(mask)
    expected[5:25, 5:30] = True
    assert np.array_equal(preprocess.largest_region_filled(mask), expected)


def test_an_ensemble_of_one_checkpoint_listed_twice_equals_that_checkpoint(ckpt, demo):
    _, _, splits = demo
    single = predict.load_predictor([ckpt], "Model", CPU)
    twice = predict.load_predictor([ckpt, ckpt], "Model", CPU)
    assert len(twice.members) == 2
    batch = torch.cat([preprocess.eval_input(p.image, NET_SIZE)[0] for p in splits["test"]])
    assert np.allclose(single.batch(batch, splits["test"]), twice.batch(batch, splits["test"]),
                       atol=1e-6)
    image = splits["test"][0].image
    assert np.allclose(single.image(image), twice.image(image), atol=1e-6)


def test_an_ensemble_of_two_image_sizes_averages_each_models_map_at_original_size(ckpt, demo,
                                                                                 tmp_path):
    """--evaluate's batches and --image both give each image the mean of the members' maps,
    each resized from its own network size straight to the image's size (the batches from
    the loader's images, which training's OpenCV resize shrank; --image through the members'
    own ImageProbability, docs/deployment.md)."""
    root, split_file, splits = demo
    pairs = splits["test"]
    big = write_checkpoint(tmp_path / "big.pth", root, split_file, True,
                           [p.image for p in pairs], size=(128, 128), seed=1)
    ensemble = predict.load_predictor([ckpt, big], "Model", CPU)
    hws = [Image.open(p.image).size[::-1] for p in pairs]
    batch = torch.cat([preprocess.eval_input(p.image, NET_SIZE)[0] for p in pairs])
    maps = ensemble.batch(batch, pairs)
    for pair, got, hw in zip(pairs, maps, hws):
        # decoded once, at the scale the larger member needs, for both members
        decoded = preprocess.read_image(pair.image, min_hw=ensemble.decode_hw)
        members = [predict.Predictor([member], CPU).probability(decoded, hw)
                   for member in ensemble.members]
        expected = np.mean(members, axis=0)
        np.testing.assert_allclose(ensemble.image(pair.image), expected, atol=1e-5)
        loaded = [predict.predict_batch(m, preprocess.eval_input(
            pair.image, ckpt_lib.input_settings(c))[0], CPU)[0] for m, c, _ in ensemble.members]
        got = preprocess.prob_to_original(got, hw)  # as the scoring threads resize it
        assert got.shape == expected.shape == hw
        np.testing.assert_allclose(got, np.mean([preprocess.prob_to_original(m, hw)
                                                 for m in loaded], axis=0), atol=1e-5)
        # the big model's map squeezed through 64x64 on its way differs: not a vacuous check
        through_small = preprocess.prob_to_original(
            preprocess.prob_to_original(members[1], NET_SIZE), hw)
        assert np.abs(through_small - members[1]).max() > 1e-3


def test_cross_validation_pools_the_out_of_fold_images(tmp_path, capsys):
    from demo_data import make_demo
    data, out = tmp_path / "data", tmp_path / "Model"
    make_demo(data, 20, 2)
    tiny = ["--data", str(data), "--model-dir", str(out), "--encoder", "resnet18",
            "--encoder-weights", "none", "--image-size", "64", "64", "--batch-size", "4",
            "--epochs", "2", "--folds", "2", "--quiet"]
    for fold in (0, 1):
        assert train_model.main([*tiny, "--fold", str(fold)]) == 0
    capsys.readouterr()
    assert test_model.main(["--cross-validation", str(out)]) == 0
    assert "replacing" not in capsys.readouterr().out
    summary = json.loads((out / "cross_validation" / "summary.json").read_text())
    with open(out / "cross_validation" / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    plain = summary["tta none, no post-processing"]
    mine = [r for r in rows if r["tta"] == "none" and r["postprocess"] == "False"]
    assert plain["images"] == len(mine) == 18  # every training pair once (the test split: 2)
    assert len({r["id"] for r in mine}) == 18 and {r["fold"] for r in mine} == {"0", "1"}
    assert plain["pooled"]["iou"] == pytest.approx(np.mean([float(r["iou"]) for r in mine]),
                                                   abs=1e-6)
    # the per-fold means and their spread, from the same CSV
    fold_means = [np.mean([float(r["iou"]) for r in mine if r["fold"] == f]) for f in "01"]
    assert [plain["per_fold"][f]["iou"] for f in "01"] == pytest.approx(fold_means, abs=1e-6)
    assert plain["fold_std"]["iou"] == pytest.approx(np.std(fold_means), abs=1e-6)
    assert plain["fold_std"]["iou"] > 0  # two folds that differ: the spread is measured
    assert len(summary) == 5  # with and without flips and post-processing; the checkpoints
    assert {f: Path(c["checkpoint"]).name for f, c in summary["checkpoints"].items()} == {
        "0": "fpn_resnet18_fold0.pth", "1": "fpn_resnet18_fold1.pth"}
    # --last: each fold's final epoch (not chosen on the fold it is scored on)
    assert test_model.main(["--cross-validation", str(out), "--last"]) == 0
    assert "replacing" not in capsys.readouterr().out  # a folder of its own
    assert test_model.main(["--cross-validation", str(out), "--last"]) == 0
    assert (f"note: replacing 2 earlier result file(s) in {out / 'cross_validation_last'}"
            in capsys.readouterr().out.splitlines())
    last = json.loads((out / "cross_validation_last" / "summary.json").read_text())
    assert {f: (Path(c["checkpoint"]).name, c["epoch"])
            for f, c in last["checkpoints"].items()} == {
        "0": ("fpn_resnet18_fold0_last.pth", 2), "1": ("fpn_resnet18_fold1_last.pth", 2)}
    assert last["tta none, no post-processing"]["images"] == 18
    # --checkpoint narrows the folds scored to the models it names
    assert test_model.main(["--cross-validation", str(out), "--checkpoint",
                            str(out / "fpn_resnet18_fold1.pth"), "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert list(one["checkpoints"]) == ["1"]
    assert one["tta none, no post-processing"]["images"] == 9
    with pytest.raises(SystemExit, match="--last goes with --cross-validation"):
        test_model.main(["--checkpoint", str(out), "--evaluate", "--last"])
