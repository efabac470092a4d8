"""report.html and the confidence on the command line: the page parses, has one entry per image,
worst first, names only files that exist and no network address; --calibrate stores a level
that --image warns below. CPU only, generated images, an untrained tiny FPN."""
import csv
import json
import re
from html.parser import HTMLParser
from urllib.parse import unquote

import numpy as np
import pytest
import torch

import device as device_lib
from PIL import Image

import demo_data
import evaluate
import load_dataset
import metrics
import model as model_lib
import preprocess
import test_model
import checkpoint as ckpt_lib
import predict
from conftest import record_of  # noqa: E402

CPU = device_lib.Compute(torch.device("cpu"))  # float32, as the tests' figures

NET_SIZE = (64, 64)
# the fixture draws its own fractions; the checkpoint's run would warn that they differ
pytestmark = pytest.mark.filterwarnings("ignore:using the split saved")


class Page(HTMLParser):
    """The thumbnails of the report, in page order, and every address it names."""

    def __init__(self):
        super().__init__()
        self.items, self.addresses = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure":
            self.items.append({"name": attrs["data-name"], "iou": float(attrs["data-iou"]),
                               "confidence": float(attrs["data-confidence"])})
        for key in ("src", "href"):
            if key in attrs:
                self.addresses.append(attrs[key])
                if tag == "img":
                    self.items[-1]["src"] = attrs[key]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    demo_data.make_demo(root, 30, 1)
    split_file = load_dataset.work_dir(root) / "split.json"
    splits = load_dataset.split_pairs(load_dataset.scan(root), seed=42, valid_fraction=0.2,
                                      test_fraction=0.2, split_file=split_file)
    return root, split_file, splits


def checkpoint(path, data, confidence=None, fold=None):
    """An untrained resnet18 FPN whose output bias is shifted so that about half of the pixels
    of the split's images are lesion: masks of mixed quality, some failed, some not."""
    root, split_file, splits = data
    torch.manual_seed(0)
    model = model_lib.build_model("resnet18", None, 5).eval()
    batch = torch.cat([preprocess.eval_input(p.image, NET_SIZE)[0]
                       for p in splits["valid"] + splits["test"]])
    with torch.inference_mode():
        model.segmentation_head[0].bias.data -= model(batch).median()
    settings = {"encoder": "resnet18", "encoder_depth": 5, "image_size": NET_SIZE,
                "threshold": 0.5, "demo": True, "data": str(root), "split_file": str(split_file),
                "seed": 42, "fold": fold, "folds": 1 if fold is None else 2}
    record = record_of(model, settings, 1, 0.5)
    if confidence is not None:
        record["confidence"] = confidence
    ckpt_lib.save_checkpoint(record, path)
    return path


def run_main(argv, capsys):
    assert test_model.main([str(a) for a in argv]) == 0
    return capsys.readouterr().out


def test_report_has_every_image_worst_first_and_names_only_files_beside_it(tmp_path, data,
                                                                           capsys):
    ckpt = checkpoint(tmp_path / "m.pth", data)
    out = tmp_path / "eval"
    printed = run_main(["--checkpoint", ckpt, "--evaluate", "--out", out, "--workers", 1],
                       capsys)
    text = (out / "report.html").read_text()
    page = Page()
    page.feed(text)
    page.close()
    with open(out / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(i["name"] for i in page.items) == sorted(r["id"] for r in rows)
    assert len(page.items) == len(data[2]["test"]) == len(rows)
    ious = [i["iou"] for i in page.items]
    assert ious == sorted(ious) and ious[0] < ious[-1]  # worst first, and not all alike
    by_id = {r["id"]: r for r in rows}
    for item in page.items:
        assert item["iou"] == pytest.approx(float(by_id[item["name"]]["iou"]), abs=1e-6)
        assert item["confidence"] == pytest.approx(float(by_id[item["name"]]["confidence"]),
                                                   abs=1e-6)
        with Image.open(out / item["src"]) as thumb:
            assert max(thumb.size) <= 256
    assert all((out / unquote(a)).is_file() for a in page.addresses)
    assert not re.search(r"https?:", text, re.I)
    summary = json.loads((out / "summary.json").read_text())
    for key in ("iou", "dice", "threshold_jaccard"):
        block = summary["intervals"][key]
        assert block["low"] <= summary[key] <= block["high"]
        assert block["mean"] == pytest.approx(summary[key])
    assert [r["set_aside"] for r in summary["review_curve"]] == list(metrics.REVIEW_FRACTIONS)
    assert summary["confidence"]["name"] == metrics.CONFIDENCE
    assert "95% bootstrap intervals" in printed


def test_the_confidence_of_image_equals_the_evaluated_one(tmp_path, data, capsys):
    ckpt = checkpoint(tmp_path / "m.pth", data)
    out = tmp_path / "eval"
    run_main(["--checkpoint", ckpt, "--evaluate", "--out", out, "--workers", 0], capsys)
    with open(out / "per_image.csv") as f:
        first = next(csv.DictReader(f))
    pair = next(p for p in data[2]["test"] if p.id == first["id"])
    printed = run_main(["--checkpoint", ckpt, "--image", pair.image, "--out", tmp_path / "one"],
                       capsys)
    found = float(re.search(r"confidence (\d\.\d+)", printed).group(1))
    assert found == pytest.approx(float(first["confidence"]), abs=2e-3)


@pytest.mark.parametrize("level, warned", [(1.01, True), (0.0, False)])
def test_image_warns_below_the_stored_level(tmp_path, data, capsys, level, warned):
    ckpt = checkpoint(tmp_path / "m.pth", data, {"name": metrics.CONFIDENCE, "level": level,
                                                  "threshold": 0.5})
    image = data[2]["test"][0].image
    printed = run_main(["--checkpoint", ckpt, "--image", image, "--out", tmp_path / "p"], capsys)
    assert ("low confidence: review this mask" in printed) == warned


def test_calibrate_stores_the_level_of_the_validation_failures(tmp_path, data, capsys):
    ckpt = checkpoint(tmp_path / "m.pth", data)
    run_main(["--checkpoint", ckpt, "--calibrate", "--out", tmp_path / "cal", "--workers", 0],
             capsys)
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)["confidence"]
    with open(tmp_path / "cal" / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(data[2]["valid"])
    conf = np.array([float(r["confidence"]) for r in rows])
    iou = np.array([float(r["iou"]) for r in rows])
    assert stored["split"] == "valid" and stored["name"] == metrics.CONFIDENCE
    assert stored["level"] == pytest.approx(metrics.calibration_level(conf, iou), abs=1e-5)
    fails = iou < metrics.JACCARD_THRESHOLD
    assert fails.any()
    assert (conf[fails] < stored["level"]).sum() == int(np.ceil(0.9 * fails.sum()))
    predict.load_model(ckpt, CPU)  # still a checkpoint inference reads


def test_report_shows_the_threshold_curve_left_beside_it(tmp_path, data, capsys):
    ckpt = checkpoint(tmp_path / "m.pth", data)
    run_main(["--checkpoint", ckpt, "--threshold-analysis", "--out", tmp_path / "threshold_valid",
              "--workers", 0], capsys)
    run_main(["--checkpoint", ckpt, "--evaluate", "--out", tmp_path / "test", "--workers", 0],
             capsys)
    text = (tmp_path / "test" / "report.html").read_text()
    assert "Threshold curve (valid split)" in text
    alone = tmp_path / "alone" / "test"
    run_main(["--checkpoint", ckpt, "--evaluate", "--out", alone, "--workers", 0], capsys)
    assert "Threshold curve" not in (alone / "report.html").read_text()


def test_cross_validation_report_has_every_out_of_fold_image(tmp_path, data, capsys):
    models = tmp_path / "folds"
    models.mkdir()
    for fold in (0, 1):
        checkpoint(models / f"fpn_resnet18_fold{fold}.pth", data, fold=fold)
    printed = run_main(["--cross-validation", models, "--workers", 0], capsys)
    out = models / "cross_validation"
    page = Page()
    page.feed((out / "report.html").read_text())
    summary = json.loads((out / "summary.json").read_text())
    plain = summary["tta none, no post-processing"]
    assert len(page.items) == plain["images"] == len(list((out / "thumbnails").glob("*.jpg")))
    ious = [i["iou"] for i in page.items]
    assert ious == sorted(ious)
    assert plain["intervals"]["iou"]["mean"] == pytest.approx(plain["pooled"]["iou"], abs=1e-5)
    assert {c["train_pairs"] for c in summary["checkpoints"].values()} == {
        plain["images"] - plain["images"] // 2, plain["images"] // 2}
    assert "out-of-fold IoU" in printed and "95% bootstrap intervals" in printed


def test_a_metric_added_to_the_registry_reaches_the_csv_the_summary_and_the_report(
        tmp_path, data, capsys, monkeypatch):
    """One entry in metrics.REGISTRY, nothing else: each image's count of predicted outline
    pixels, checked against the masks --evaluate wrote."""
    def outline(pair):
        return len(metrics.boundary_points(pair.pred)) if pair.pred.any() else 0
    monkeypatch.setattr(metrics, "REGISTRY", [*metrics.REGISTRY, metrics.Metric(
        "outline_pixels", outline, source="masks", interval=True, about="predicted outline")])
    ckpt = checkpoint(tmp_path / "m.pth", data)
    out = tmp_path / "eval"
    run_main(["--checkpoint", ckpt, "--evaluate", "--out", out, "--workers", 0], capsys)
    with open(out / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        written = np.asarray(Image.open(out / "masks" / f"{row['id']}_segmentation.png")) > 0
        expected = len(metrics.boundary_points(written)) if written.any() else 0
        assert float(row["outline_pixels"]) == expected
        assert {"hd95", "nsd"} <= set(row)  # the boundary metrics, for every evaluation
    mean = np.mean([float(r["outline_pixels"]) for r in rows])
    assert mean > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["outline_pixels"] == pytest.approx(mean)
    assert summary["intervals"]["outline_pixels"]["low"] <= mean
    assert {"hd95", "nsd"} <= set(summary["intervals"])
    text = (out / "report.html").read_text()
    assert f"<td>outline_pixels</td><td>{mean:.3f}</td>" in text
    assert "<td>hd95</td>" in text and "<td>nsd</td>" in text


@pytest.mark.parametrize("tta, views", [("none", 1), ("flips", 4)])
def test_evaluate_and_one_image_run_one_forward_pass_per_view(tmp_path, data, tta, views):
    """The confidence comes from the prediction's own map: no pass runs for it alone."""
    ckpt = checkpoint(tmp_path / "m.pth", data)
    predictor = predict.load_predictor([ckpt], None, CPU, tta)
    seen = []
    predictor.members[0][0].register_forward_pre_hook(
        lambda module, inputs: seen.append(len(inputs[0])))
    pairs = data[2]["test"]
    evaluate.evaluate_split(predictor, pairs, tmp_path / "eval", 0.5,
                            evaluate.Scoring(batch_size=3, workers=0))
    assert sum(seen) == views * len(pairs)
    seen.clear()
    evaluate.image_prediction(predictor, pairs[0].image)
    assert sum(seen) == views
