"""export_model.py: the ONNX graph against the PyTorch path of the same checkpoint(s), on real
fixture pairs, on generated images of sizes unlike the traced one, and through test_model.py;
its metadata; one-line refusals; the README's example. Tiny models trained on the CPU."""
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import device as device_lib
from PIL import Image

import demo_data
import export_model
import preprocess
import test_model
import train_model
import checkpoint as ckpt_lib
import predict

CPU = device_lib.Compute(torch.device("cpu"))  # float32, as the tests' figures

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "isic_sample"
TINY = ["--encoder", "resnet18", "--encoder-weights", "none", "--batch-size", "4",
        "--workers", "0", "--device", "cpu", "--quiet", "--lr", "1e-3"]
SIZES = [(200, 300), (97, 131), (576, 768), (256, 256), (48, 40)]  # (h, w); none the traced
PROB_TOLERANCE = 1e-2  # the bound; the figures reached are printed (pytest -s)
MASK_TOLERANCE = 0.001  # share of an image's pixels whose mask may differ


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two tiny FPNs trained on 40 demo pairs at 64x64 (10 and 8 epochs), exported alone (the
    first) and as an ensemble with flipped views; and a mixed ensemble whose second member
    runs at 96x64 (the second model's checkpoint with that network size)."""
    root = tmp_path_factory.mktemp("export")
    data = root / "demo"
    demo_data.make_demo(data, 40, 0)
    runs = {}
    for name, epochs in (("a", "10"), ("b", "8")):
        assert train_model.main(["--data", str(data), "--model-dir", str(root / name), *TINY,
                                 "--image-size", "64", "64", "--epochs", epochs]) == 0
        runs[name] = root / name / "fpn_resnet18.pth"
    wide = torch.load(runs["b"], weights_only=True)
    wide["settings"]["image_size"] = [96, 64]
    runs["wide"] = root / "wide" / "fpn_resnet18.pth"
    runs["wide"].parent.mkdir()
    ckpt_lib.save_checkpoint(wide, runs["wide"])

    def export(*args):
        return export_model.export(export_model.parse_args(list(map(str, args))))
    return {**runs, "data": data, "single": export("--checkpoint", runs["a"]),
            "ensemble": export("--checkpoint", runs["a"], runs["b"], "--tta", "flips",
                               "--out", root / "ensemble.onnx"),
            "mixed": export("--checkpoint", runs["a"], runs["wide"], "--tta", "flips",
                            "--out", root / "mixed.onnx")}


def members(paths):
    return predict.load_predictor([str(p) for p in paths], None, CPU).members


def session(path):
    return predict.onnx_session(path)


def cases(trained, mixed=True):
    """(name, ONNX file, PyTorch members, views) of each export; `mixed`: with the ensemble
    of two network sizes, which test_model.py decodes per member for PyTorch (so the two
    paths get different pixels from a large JPEG; docs/deployment.md)."""
    found = [("single", trained["single"], members([trained["a"]]), "none"),
             ("ensemble", trained["ensemble"], members([trained["a"], trained["b"]]), "flips")]
    if mixed:
        found.append(("mixed", trained["mixed"], members([trained["a"], trained["wide"]]),
                      "flips"))
    return found


# ----------------------------------------------------------------------------- the graph

def test_file_passes_the_checker_and_names_its_sources(trained, capsys):
    for path in (trained["single"], trained["ensemble"], trained["mixed"]):
        onnx.checker.check_model(str(path), full_check=True)
    assert trained["single"] == trained["a"].with_name("fpn_resnet18.onnx")  # beside the model
    meta = predict.onnx_metadata(trained["mixed"])
    assert meta["encoder"] == "resnet18,resnet18" and meta["network_size"] == "64x64,96x64"
    assert meta["tta"] == "flips" and meta["views"] == "4" and meta["opset"] == "20"
    assert json.loads(meta["mean"])[1] == list(preprocess.IMAGENET_MEAN)
    assert float(meta["threshold"]) == 0.5 and meta["interpolation"] == "area,area"
    sources = json.loads(meta["sources"])
    assert [s["file"] for s in sources] == ["fpn_resnet18.pth", "fpn_resnet18.pth"]
    assert [s["sha256"] for s in sources] == [
        hashlib.sha256(Path(trained[k]).read_bytes()).hexdigest() for k in ("a", "wide")]
    assert json.loads(meta["recipe"])[0]["lr"] == 1e-3 and meta["arch"] == "FPN,FPN"
    assert export_model.main(["--info", str(trained["mixed"])]) == 0
    out = capsys.readouterr().out
    assert "network_size: 64x64,96x64" in out and sources[1]["sha256"] in out


@pytest.mark.parametrize("hw", SIZES)
def test_graph_equals_the_pytorch_path_at_sizes_unlike_the_traced_one(trained, hw):
    image = export_model.check_image(hw, seed=hw[0])
    for name, path, ms, tta in cases(trained):
        prob, mask = session(path).run(None, {"image": image})
        assert prob.shape == hw and prob.dtype == np.float32
        assert mask.shape == hw and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}
        ref = export_model.torch_probability(ms, image, tta)
        diff = float(np.abs(prob - ref).max())
        print(f"{name} {hw[1]}x{hw[0]}: largest probability difference {diff:.1e}")
        # cv2's resize bit for bit (48x40 is enlarged): only float rounding remains
        assert diff <= 1e-4
        assert np.mean((mask > 0) != (ref >= 0.5)) <= MASK_TOLERANCE


def test_real_fixture_pairs_agree_with_pytorch(trained):
    """The 12 real ISIC pairs decoded whole: the graph against the PyTorch path's steps."""
    images = sorted((FIXTURES / "images").glob("*.jpg"))
    assert len(images) == 12
    for name, path, ms, tta in cases(trained):
        run, worst, worst_share = session(path), 0.0, 0.0
        for image_path in images:
            image = preprocess.read_image(image_path)
            prob, mask = run.run(None, {"image": image})
            ref = export_model.torch_probability(ms, image, tta)
            worst = max(worst, float(np.abs(prob - ref).max()))
            worst_share = max(worst_share, float(np.mean((mask > 0) != (ref >= 0.5))))
        print(f"{name}, 12 fixtures: largest probability difference {worst:.1e}, "
              f"mask pixels differing at most {worst_share:.4%}")
        assert worst <= PROB_TOLERANCE and worst_share <= MASK_TOLERANCE


# ----------------------------------------------------------------------------- test_model.py

def masks_of(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*_segmentation.png"))}


def compare_masks(a, b):
    assert a.keys() == b.keys() and a
    shares = [np.mean(a[k] != b[k]) for k in a]
    assert all(a[k].shape == b[k].shape for k in a)
    return max(shares)


def test_image_mode_with_an_onnx_file_gives_the_pytorch_masks(trained, tmp_path, capsys):
    folder = tmp_path / "images"
    shutil.copytree(FIXTURES / "images", folder)
    source = np.asarray(Image.open(folder / "ISIC_0001131.jpg"))
    # grey and RGBA inputs are converted as the PyTorch path converts them
    Image.fromarray(source[..., 1]).save(folder / "grey.png")
    Image.fromarray(np.dstack([source, np.full(source.shape[:2], 200, np.uint8)])).save(
        folder / "rgba.png")
    for name, path, ms, tta in cases(trained, mixed=False):
        pth = [str(p) for _, _, p in ms]
        assert test_model.main(["--checkpoint", *pth, "--tta", tta, "--image", str(folder),
                                "--out", str(tmp_path / f"{name}_pth")]) == 0
        assert test_model.main(["--checkpoint", str(path), "--image", str(folder),
                                "--out", str(tmp_path / f"{name}_onnx")]) == 0
        out = capsys.readouterr().out
        assert f"{path} runs through onnxruntime" in out and f"views: {tta}" in out
        share = compare_masks(masks_of(tmp_path / f"{name}_pth"),
                              masks_of(tmp_path / f"{name}_onnx"))
        with capsys.disabled():
            print(f"{name}: --image masks differ in at most {share:.4%} of the pixels")
        assert share <= MASK_TOLERANCE
        assert len(masks_of(tmp_path / f"{name}_onnx")) == 14


def summary(folder):
    return json.loads((folder / "summary.json").read_text())


def test_evaluate_with_an_onnx_file_reports_the_pytorch_scores(trained, tmp_path, capsys):
    for name, path, ms, tta in cases(trained, mixed=False):
        pth = [str(p) for _, _, p in ms]
        assert test_model.main(["--checkpoint", *pth, "--tta", tta, "--evaluate",
                                "--workers", "0", "--out", str(tmp_path / f"{name}_pth")]) == 0
        assert test_model.main(["--checkpoint", str(path), "--evaluate", "--workers", "0",
                                "--out", str(tmp_path / f"{name}_onnx")]) == 0
        assert "runs through onnxruntime" in capsys.readouterr().out
        a, b = summary(tmp_path / f"{name}_pth"), summary(tmp_path / f"{name}_onnx")
        assert a["images"] == b["images"] == 4 and b["tta"] == tta
        assert 0.3 < a["iou"] < 1  # a trained model: its masks are neither empty nor full
        gaps = {k: abs(a[k] - b[k]) for k in ("iou", "dice", "threshold_jaccard",
                                               "sensitivity", "specificity", "accuracy")}
        share = compare_masks(masks_of(tmp_path / f"{name}_pth" / "masks"),
                              masks_of(tmp_path / f"{name}_onnx" / "masks"))
        with capsys.disabled():
            print(f"{name}: --evaluate summaries differ by at most {max(gaps.values()):.1e}, "
                  f"masks in at most {share:.4%} of the pixels")
        assert max(gaps.values()) <= 1e-3 and share <= MASK_TOLERANCE


def test_views_the_file_does_not_hold_are_refused(trained, tmp_path):
    with pytest.raises(SystemExit) as exc:
        test_model.main(["--checkpoint", str(trained["single"]), "--tta", "flips",
                         "--image", str(FIXTURES / "images")])
    assert "export again with `python export_model.py --tta flips`" in str(exc.value.code)


# ----------------------------------------------------------------------------- bad input

def one_error_line(script, *args, cwd):
    proc = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize("kind, message", [
    ("missing", "no checkpoint at"),
    ("corrupt", "not a readable checkpoint"),
    ("pickled", "pickled"),
])
def test_bad_checkpoint_is_refused_in_one_line(trained, tmp_path, kind, message):
    bad = tmp_path / "bad.pth"
    if kind == "corrupt":
        bad.write_bytes(trained["a"].read_bytes()[:100_000])
    elif kind == "pickled":
        torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 1, 1)), bad)
    line = one_error_line("export_model.py", "--checkpoint", bad, cwd=tmp_path)
    assert line.startswith("error: ") and message in line and str(bad) in line
    assert not list(tmp_path.glob("*.onnx"))


def test_onnx_file_not_made_by_export_model_is_refused_with_what_it_lacks(tmp_path):
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "other",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    other = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph), str(other))
    image = FIXTURES / "images" / "ISIC_0001131.jpg"
    line = one_error_line("test_model.py", "--checkpoint", other, "--image", image,
                          cwd=tmp_path)
    assert f"{other} was not made by export_model.py: it lacks metadata 'format'" in line
    assert "an input 'image' of uint8 (height, width, 3)" in line
    assert "an output 'probability'" in line
    (tmp_path / "text.onnx").write_text("not a model")
    line = one_error_line("export_model.py", "--info", tmp_path / "text.onnx", cwd=tmp_path)
    assert "is not a readable ONNX file" in line


# ----------------------------------------------------------------------------- docs/deployment.md

def readme_example():
    text = (REPO / "docs" / "deployment.md").read_text()
    section = text.split("## Deploying a model", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs_as_written(trained, tmp_path):
    code = readme_example()
    assert "import export_model" not in code and "preprocess" not in code  # no repo code
    shutil.copy(trained["single"], tmp_path / "fpn_resnet18.onnx")
    shutil.copy(FIXTURES / "images" / "ISIC_0013134.jpg", tmp_path / "lesion.jpg")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("resnet18 at 64x64: lesion in ")
    written = np.asarray(Image.open(tmp_path / "lesion_segmentation.png"))
    expected = session(trained["single"]).run(
        None, {"image": preprocess.read_image(tmp_path / "lesion.jpg")})[1]
    assert written.shape == (256, 256) and np.array_equal(written, expected)


# ----------------------------------------------------------------------------- the resize

def resize_graph(size_hw, interpolation):
    from onnx import TensorProto, helper
    g = export_model.Graph()
    out = export_model.resize_image(g, "image", size_hw, interpolation)
    g.nodes.append(helper.make_node("Identity", [out], ["small"]))
    graph = helper.make_graph(
        g.nodes, "resize", [helper.make_tensor_value_info("image", TensorProto.UINT8,
                                                          ["h", "w", 3])],
        [helper.make_tensor_value_info("small", TensorProto.FLOAT, [*size_hw, 3])], g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("",
                                                                        export_model.OPSET)])
    proto.ir_version = 10
    onnx.checker.check_model(proto, full_check=True)
    return proto


@pytest.mark.parametrize("size_hw, interpolation", [((64, 64), "area"), ((96, 64), "area"),
                                                    ((64, 64), "linear")])
def test_graph_resize_is_cv2s(size_hw, interpolation):
    """Whole shrink factors and enlargements equal preprocess.resize_pair bit for bit; other
    shrinks sum in another order than cv2, which moves a value that lies on .5 by one level."""
    import onnxruntime
    proto = resize_graph(size_hw, interpolation)
    run = onnxruntime.InferenceSession(proto.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for hw in [(128, 128), (192, 128), (576, 768), (40, 50), (33, 90), (200, 300), (97, 131)]:
        image = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
        got = run.run(None, {"image": image})[0]
        expected = preprocess.resize_pair(image, None, size_hw, interpolation)[0]
        off = np.abs(got - expected.astype(np.float32))
        whole = hw[0] % size_hw[0] == 0 and hw[1] % size_hw[1] == 0
        if whole or interpolation == "linear" or hw[0] < size_hw[0] or hw[1] < size_hw[1]:
            assert off.max() == 0, hw
        else:
            assert off.max() <= 1 and np.mean(off > 0) < 0.01, hw


# ----------------------------------------------------------------------------- the benchmark

def test_benchmark_report_gives_images_per_second_and_the_ratio():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import onnx_speed
    images = [np.zeros((2, 3, 3), np.uint8), np.zeros((4, 5, 3), np.uint8)]
    seconds = {"pytorch": np.array([[1.0, 1.0], [2.0, 2.0], [1.0, 3.0]]),
               "onnxruntime": np.array([[0.5, 0.5], [0.5, 0.5], [1.0, 1.0]])}
    lines, ratio = onnx_speed.report(seconds, images, ["header"])
    # rounds: PyTorch 1.0, 0.5, 0.5 images/s; onnxruntime 2.0, 2.0, 1.0; ratios 2, 4, 2
    assert ratio == 2.0
    assert "  PyTorch      0.50 (0.50 to 1.00)" in lines
    assert "  onnxruntime  2.00 (1.00 to 2.00)" in lines
    assert "  ratio onnxruntime / PyTorch  2.00 (2.00 to 4.00)" in lines
    assert "  5x4  2.000 s  0.500 s  4.00x" in lines  # medians of 1, 2, 3 and .5, .5, 1
