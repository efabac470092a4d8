"""export_model.py and onnx_format.py: the ONNX graph against the PyTorch path of the same
checkpoint(s) (the one module predict.ImageProbability, traced), on real fixture pairs, on
generated images of sizes and aspect ratios unlike the traced one, and through test_model.py;
its metadata; files of the previous format version; the int8 graph; one-line refusals; the
README's example. Tiny models trained on the CPU."""
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
import onnx_format
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
SIZES = [(200, 300), (97, 131), (576, 768), (256, 256), (48, 40), (300, 64)]  # (h, w)
# The graph and PyTorch compute the same steps in float32 (onnxruntime's Resize with
# antialias equals torch's to about 1e-3 grey levels, its kernels sum in other orders): the
# probabilities agree to PROB_TOLERANCE (reached: about 1e-5; up to 2e-4 where the image is
# enlarged), and a mask pixel may differ only where the probability lies within
# PROB_TOLERANCE of the threshold.
PROB_TOLERANCE = 1e-3
V2 = Path(__file__).parent / "data" / "export_v2"  # written by the version-2 export
# test_model.py --evaluate and --image with a .pth feed the network images shrunk by training's
# OpenCV area resize (the loader's, evaluate.image_prediction); the graph resizes with its
# antialiased Resize. Measured on the sample's
# 84 held-out images with a fold model of the CPU recipe (docs/deployment.md): mask pixels
# differing 0.13% per image on average, 1.30% at most, mean IoU 0.0003 lower.
RESIZE_MASK_TOLERANCE = 0.02
RESIZE_SCORE_TOLERANCE = 0.01


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


def session_of(proto, path):
    onnx.save(proto, str(path))
    return session(path)


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

def torch_probability(ms, image, tta):
    """The PyTorch path test_model.py runs on a decoded image, in float32."""
    return predict.Predictor(ms, CPU, tta).probability(image)


def mask_differs_only_where_precision_explains(mask, ref, threshold=0.5):
    """Mask pixels that differ all lie within PROB_TOLERANCE of the threshold."""
    differ = (mask > 0) != (ref >= threshold)
    return bool(np.all(np.abs(ref[differ] - threshold) <= PROB_TOLERANCE))


def test_file_passes_the_checker_and_names_its_sources(trained, capsys):
    for path in (trained["single"], trained["ensemble"], trained["mixed"]):
        onnx.checker.check_model(str(path), full_check=True)
    assert trained["single"] == trained["a"].with_name("fpn_resnet18.onnx")  # beside the model
    meta = onnx_format.read_metadata(trained["mixed"])
    assert meta["version"] == "3" and meta["precision"] == "float32"
    assert meta["resize"] == onnx_format.RESIZE_ANTIALIAS
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


def test_graph_resizes_with_standard_resize_nodes_and_export_model_stays_short(trained):
    """The resize to the network size is one Resize node per member (linear, antialiased);
    no hand-built resize (running sums, integer convolutions, gathered taps) is left."""
    graph = onnx.load(str(trained["mixed"])).graph
    ops = [n.op_type for n in graph.node]
    resizes = [n for n in graph.node if n.op_type == "Resize"
               and onnx.helper.get_attribute_value(
                   next(a for a in n.attribute if a.name == "antialias")) == 1]
    assert len(resizes) == 2  # the mixed ensemble: one per network size
    assert not {"CumSum", "ConvInteger", "If", "GatherND"} & set(ops)
    assert len((REPO / "export_model.py").read_text().splitlines()) <= 250


@pytest.mark.parametrize("hw", SIZES)
def test_graph_equals_the_pytorch_path_at_sizes_unlike_the_traced_one(trained, hw):
    image = export_model.check_image(hw, seed=hw[0])
    for name, path, ms, tta in cases(trained):
        prob, mask = session(path).run(None, {"image": image})
        assert prob.shape == hw and prob.dtype == np.float32
        assert mask.shape == hw and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}
        ref = torch_probability(ms, image, tta)
        diff = float(np.abs(prob - ref).max())
        print(f"{name} {hw[1]}x{hw[0]}: largest probability difference {diff:.1e}")
        assert diff <= PROB_TOLERANCE
        assert mask_differs_only_where_precision_explains(mask, ref)


def test_output_size_sets_the_size_of_the_outputs(trained):
    """A JPEG decoded at a reduced scale: the graph resizes the map straight to the size
    given, as the PyTorch path does."""
    image = export_model.check_image((150, 200))
    for name, path, ms, tta in cases(trained):
        prob, mask = session(path).run(None, {"image": image,
                                              "output_size": np.array([300, 400])})
        ref = predict.Predictor(ms, CPU, tta).probability(image, (300, 400))
        assert prob.shape == mask.shape == (300, 400)
        assert np.abs(prob - ref).max() <= PROB_TOLERANCE


def test_real_fixture_pairs_agree_with_pytorch(trained):
    """The 12 real ISIC pairs decoded whole: the graph against the PyTorch path."""
    images = sorted((FIXTURES / "images").glob("*.jpg"))
    assert len(images) == 12
    for name, path, ms, tta in cases(trained):
        run, worst = session(path), 0.0
        for image_path in images:
            image = preprocess.read_image(image_path)
            prob, mask = run.run(None, {"image": image})
            ref = torch_probability(ms, image, tta)
            worst = max(worst, float(np.abs(prob - ref).max()))
            assert mask_differs_only_where_precision_explains(mask, ref), image_path.name
        print(f"{name}, 12 fixtures: largest probability difference {worst:.1e}")
        assert worst <= PROB_TOLERANCE


# ----------------------------------------------------------------------------- older records

def test_files_of_the_version_2_export_load_and_run_as_written():
    """tests/data/export_v2 (its README says how it was made): the version-2 file's metadata
    migrates to version 3, OnnxPredictor runs it, and its graph still computes what the
    version-2 export built: OpenCV's area resize, the network over flipped views, the linear
    resize back, here rebuilt from its checkpoint."""
    path = V2 / "unet_tu-mobilenetv3_small_050.onnx"
    meta = onnx_format.read_metadata(path)
    assert meta["version"] == "3" and meta["resize"] == onnx_format.RESIZE_OPENCV
    assert meta["precision"] == "float32" and meta["tta"] == "flips"
    predictor = predict.load_predictor([str(path)], None, CPU)
    model, ckpt = predict.load_model(V2 / "unet_tu-mobilenetv3_small_050.pth", CPU)
    module = predict.ImageProbability([model], [(32, 32)], "flips")
    for hw in [(200, 300), (97, 131)]:
        image = export_model.check_image(hw, seed=1)
        small, _ = preprocess.resize_pair(image, None, (32, 32), "area")
        with torch.inference_mode():
            net = module.network_probability(0, preprocess.to_tensor(small)[None])
        ref = preprocess.prob_to_original(net[0], hw)
        assert np.abs(predictor.probability(image) - ref).max() <= PROB_TOLERANCE


def test_version_2_checkpoint_exports(tmp_path):
    """The committed version-2 checkpoint exports to version 3 and agrees with PyTorch."""
    pth = V2 / "unet_tu-mobilenetv3_small_050.pth"
    out = export_model.export(export_model.parse_args(
        ["--checkpoint", str(pth), "--out", str(tmp_path / "v3.onnx"), "--tta", "flips"]))
    image = export_model.check_image((120, 90))
    prob = session(out).run(["probability"], {"image": image})[0]
    ref = torch_probability(members([pth]), image, "flips")
    assert np.abs(prob - ref).max() <= PROB_TOLERANCE


@pytest.mark.parametrize("version, message", [("9", "update the project"),
                                              ("1", "export it again")])
def test_versions_this_code_cannot_read_are_refused(tmp_path, version, message):
    proto = onnx.load(str(V2 / "unet_tu-mobilenetv3_small_050.onnx"))
    for entry in proto.metadata_props:
        if entry.key == "version":
            entry.value = version
    path = tmp_path / "other.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(onnx_format.FormatError, match=message):
        onnx_format.read_metadata(path)


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
        assert share <= RESIZE_MASK_TOLERANCE  # OpenCV's resize on the .pth side
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
        assert max(gaps.values()) <= RESIZE_SCORE_TOLERANCE and share <= RESIZE_MASK_TOLERANCE


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


# ----------------------------------------------------------------------------- int8

def test_int8_file_quantises_the_convolutions_keeps_the_resizes_float_and_is_checked(
        trained, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    export_model.main(["--checkpoint", str(trained["a"]), "--out", str(out), "--int8",
                       "--int8-max-iou-loss", "1", "--calibration-images", "8"])
    int8 = tmp_path / "model_int8.onnx"
    meta = onnx_format.read_metadata(int8)
    check = json.loads(meta["int8_check"])
    assert meta["precision"] == "int8" and check["images"] == 4  # the run's validation split
    assert check["iou_loss"] == pytest.approx(check["iou_float32"] - check["iou_int8"])
    graph = onnx.load(str(int8)).graph
    made = {o: n for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    quantised = [c for c in convs if made.get(c.input[1]) is not None
                 and made[c.input[1]].op_type == "DequantizeLinear"]
    assert len(quantised) >= 0.75 * len(convs)  # the network runs in int8 ...
    assert convs[0] not in quantised and convs[-1] not in quantised  # ... but its ends
    read_by = {}
    for node in graph.node:
        for name in node.input:
            read_by.setdefault(name, []).append(node.op_type)
    linear = [n for n in graph.node if n.op_type == "Resize" and any(
        a.name == "mode" and a.s == b"linear" for a in n.attribute)]
    assert len(linear) >= 3  # the image's, the decoder's, the one back to the image's size
    for node in linear:  # no Q/DQ pair wraps a linear Resize (a known wrong result)
        assert not (made[node.input[0]].op_type == "DequantizeLinear"
                    and "QuantizeLinear" in read_by.get(node.output[0], []))
    image_resizes = [n for n in graph.node if n.op_type == "Resize" and any(
        a.name == "antialias" and a.i == 1 for a in n.attribute)]
    assert len(image_resizes) == 1  # the image's resize reads float pixels
    assert made[image_resizes[0].input[0]].op_type != "DequantizeLinear"
    prob, mask = session(int8).run(None, {"image": export_model.check_image((90, 120))})
    assert prob.shape == mask.shape == (90, 120)
    assert "mask pixels differ from float32" in capsys.readouterr().out


def test_spatial_means_become_global_average_pools_with_the_same_result(tmp_path):
    """A ReduceMean over the two spatial axes of a 4-D tensor, keeping them, becomes a
    GlobalAveragePool; one over the channels, or dropping the axes, stays as it is."""
    from onnx import TensorProto, helper, numpy_helper
    axes = {"hw": [-1, -2], "c": [1], "hw_pos": [2, 3]}
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x", "hw"], ["a"]),
         helper.make_node("ReduceMean", ["x", "c"], ["b"]),
         helper.make_node("ReduceMean", ["x", "hw_pos"], ["d"], keepdims=0)], "means",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 5])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "abd"],
        [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in axes.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    x = np.random.default_rng(0).normal(size=(1, 3, 4, 5)).astype(np.float32)
    before = session_of(proto, tmp_path / "before.onnx").run(None, {"x": x})
    assert onnx_format.global_pools(proto) == 1
    assert [n.op_type for n in proto.graph.node] == ["GlobalAveragePool", "ReduceMean",
                                                      "ReduceMean"]
    after = session_of(proto, tmp_path / "after.onnx").run(None, {"x": x})
    assert np.allclose(after[0], x.mean(axis=(2, 3), keepdims=True), atol=1e-6)
    for old, new in zip(before, after):
        assert old.shape == new.shape and np.allclose(old, new, atol=1e-6)


def test_resize_back_then_squeezed_becomes_a_planar_resize_with_the_same_map(tmp_path):
    """A Resize to a size computed at run time, squeezed from (1, 1, H, W) to (H, W), resizes
    the squeezed map instead and writes the output itself; the same values."""
    from onnx import TensorProto, helper, numpy_helper
    graph = helper.make_graph(
        [helper.make_node("Resize", ["x", "", "", "size"], ["big"], name="back", mode="linear"),
         helper.make_node("Squeeze", ["big", "one"], ["big3"], name="s1"),
         helper.make_node("Squeeze", ["big3", "zero"], ["p"], name="s0")], "back",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 5]),
         helper.make_tensor_value_info("size", TensorProto.INT64, [4])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([v], np.int64), k) for k, v in (("one", 1),
                                                                           ("zero", 0))])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    feed = {"x": np.random.default_rng(1).random((1, 1, 4, 5), dtype=np.float32),
            "size": np.array([1, 1, 9, 13], np.int64)}
    before = session_of(proto, tmp_path / "before.onnx").run(None, feed)[0]
    assert onnx_format.planar_resizes_back(proto) == 1
    assert [n.op_type for n in proto.graph.node] == ["Squeeze", "Slice", "Resize"]
    assert proto.graph.node[-1].output[0] == "p"
    after = session_of(proto, tmp_path / "after.onnx").run(None, feed)[0]
    assert before.shape == after.shape == (9, 13) and np.array_equal(before, after)


def test_grouped_convolutions_and_their_relus_stay_float(tmp_path):
    """float_nodes: the first and last convolutions, a grouped convolution with the ReLU on
    either side, and the producer of a linear Resize's input; not the plain middle ones."""
    from onnx import TensorProto, helper, numpy_helper
    weights = {"w1": (4, 3, 1, 1), "w2": (4, 2, 3, 3), "w3": (4, 4, 1, 1), "w4": (4, 4, 1, 1),
               "w5": (1, 4, 1, 1)}
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="first"),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu_before"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="grouped", group=2,
                              pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu_after"),
             helper.make_node("Conv", ["r2", "w3"], ["c3"], name="plain"),
             helper.make_node("Relu", ["c3"], ["r3"], name="feeds_resize"),
             helper.make_node("Resize", ["r3", "", "scales"], ["up"], name="up",
                              mode="linear"),
             helper.make_node("Conv", ["up", "w4"], ["c4"], name="reads_resize"),
             helper.make_node("Conv", ["c4", "w5"], ["y"], name="last")]
    inits = [numpy_helper.from_array(np.ones(shape, np.float32), k)
             for k, shape in weights.items()]
    inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(path))
    assert set(onnx_format.float_nodes(path)) == {"first", "relu_before", "grouped",
                                                  "relu_after", "feeds_resize", "last"}


def test_int8_file_losing_too_much_iou_is_not_kept(trained, tmp_path):
    out = tmp_path / "model.onnx"
    with pytest.raises(SystemExit) as exc:  # a loss above -1 always counts as too much
        export_model.main(["--checkpoint", str(trained["a"]), "--out", str(out), "--int8",
                           "--int8-max-iou-loss", "-1", "--calibration-images", "4"])
    assert "not written; use the float32 file" in str(exc.value.code)
    assert out.exists() and not (tmp_path / "model_int8.onnx").exists()


# ----------------------------------------------------------------------------- the benchmark

def test_benchmark_report_gives_images_per_second_and_the_ratios():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import onnx_speed
    images = [(np.zeros((1, 1, 3), np.uint8), (2, 3)), (np.zeros((1, 2, 3), np.uint8), (4, 5))]
    seconds = {"pytorch": np.array([[1.0, 1.0], [2.0, 2.0], [1.0, 4.0]]),
               "float32": np.array([[0.5, 0.5], [0.5, 0.5], [1.0, 1.0]]),
               "int8": np.array([[0.25, 2.0], [0.5, 2.0], [0.5, 2.0]])}
    lines, worst = onnx_speed.report(seconds, images)
    # 3x2: PyTorch 1, 0.5, 1 images/s (median 1); float32 2, 2, 1 (median 2); ratios 2, 4, 1
    assert lines[0].startswith("  3x2  pytorch 1.00/s  float32 2.00/s  int8 2.00/s  |")
    assert "float32/pytorch 2.00 (1.00 to 4.00)" in lines[0]
    assert "int8/pytorch 4.00 (2.00 to 4.00)" in lines[0]
    # 5x4: float32 ratios 2, 4, 4 (median 4); int8 0.5, 1, 2 (median 1)
    assert worst == {"float32": 2.0, "int8": 1.0}


def test_benchmark_times_pytorch_as_test_model_image_makes_the_mask(trained, tmp_path):
    """onnx_speed's PyTorch way, from the image decoded as test_model.py decodes it, gives the
    mask of evaluate.image_prediction (test_model.py --image with a .pth) exactly; cut at the
    map's median, so that half the pixels lie near the cut and another resize would show."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import evaluate
    import onnx_speed
    predictor = predict.load_predictor([str(trained["a"])], None, CPU)
    for hw in ((200, 300), (97, 131)):  # shrunk to 64x64 by OpenCV's area resize
        path = tmp_path / f"{hw[0]}x{hw[1]}.png"
        Image.fromarray(export_model.check_image(hw, seed=hw[1])).save(path)
        image, hw = predict.read_with_size(path, predictor.decode_hw)
        prob = evaluate.image_prediction(predictor, path)[0]
        threshold = float(np.median(prob))
        mask = onnx_speed.pytorch_way(predictor, threshold, path)(image, hw)
        assert mask.shape == prob.shape == hw
        assert np.array_equal(mask > 0, preprocess.binarise(prob, threshold))
