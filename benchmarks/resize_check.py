"""The facts behind the graph's resize (docs/deployment.md): ONNX's antialiased linear Resize
in onnxruntime against PyTorch's and against training's OpenCV area resize, on real images,
and what the substitution does to a trained model's masks.

    OMP_NUM_THREADS=1 python benchmarks/resize_check.py --checkpoint Model/fpn_resnet18_fold0.pth

Prints, per target size: the largest difference of onnxruntime's Resize (linear, antialias=1)
from torch's F.interpolate(antialias=True) with exclude_outside 1 and 0; the mean shift of a
uint8 Resize from the rounded float one; and the grey-level differences (mean, 99th
percentile, largest) of the antialiased resize from cv2.INTER_AREA. With --checkpoint (a
model of the sample), the masks of its run's held-out images (test split and validation)
with each resize: the share of mask pixels that differ, mean IoU and thresholded Jaccard.
"""
import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import device as device_lib  # noqa: E402
import load_dataset  # noqa: E402
import metrics  # noqa: E402
import pipeline  # noqa: E402  (its ISIC-sized JPEG generator)
import predict  # noqa: E402
import preprocess  # noqa: E402

DATA = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "isic2018_task1_sample")
TARGETS = [(128, 128), (96, 96), (150, 200), (320, 320)]  # (height, width)


def ort_resize(size_hw, exclude_outside=1, uint8=False):
    """A function running one onnxruntime Resize (linear, antialias=1) of (H, W, 3)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    kind = TensorProto.UINT8 if uint8 else TensorProto.FLOAT
    node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="linear", antialias=1,
                            exclude_outside=exclude_outside)
    graph = helper.make_graph([node], "resize", [helper.make_tensor_value_info(
        "x", kind, [1, 3, "h", "w"])], [helper.make_tensor_value_info("y", kind, None)],
        [numpy_helper.from_array(np.array([1, 3, *size_hw], np.int64), "sizes")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    run = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    dtype = np.uint8 if uint8 else np.float32
    return lambda im: run.run(None, {"x": im.transpose(2, 0, 1)[None].astype(dtype)})[0][
        0].transpose(1, 2, 0).astype(np.float32)


def torch_resize(image, size_hw):
    """The module's resize (predict.resize_image) of a uint8 (H, W, 3) image, unrounded."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    return torch.nn.functional.interpolate(x, size_hw, mode="bilinear", antialias=True,
                                           align_corners=False)[0].permute(1, 2, 0).numpy()


def image_sets(data):
    """The sample's first 40 images and two generated ISIC-sized JPEGs, decoded."""
    import tempfile
    sample = [preprocess.read_image(p) for p in sorted(Path(data, "images").glob("*.jpg"))[:40]]
    large = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (w, h) in enumerate([(1024, 768), (3008, 2000)]):
            path = Path(tmp) / f"ISIC_{i:07d}.jpg"
            pipeline._write_pair((w, h, path, Path(tmp) / f"m{i}.png", [0, i]))
            large.append(preprocess.read_image(path))
    return {"sample 256x256": sample, "generated 1024x768, 3008x2000": large}


def facts(data):
    for name, images in image_sets(data).items():
        for size in TARGETS:
            if size[0] > min(images[0].shape[:2]):
                continue
            runs = [ort_resize(size, 1), ort_resize(size, 0), ort_resize(size, 1, True)]
            ex1, ex0, shift, area = [], [], [], []
            for im in images:
                ref = torch_resize(im, size)
                ex1.append(np.abs(runs[0](im) - ref).max())
                ex0.append(np.abs(runs[1](im) - ref).max())
                shift.append(np.mean(runs[2](im) - np.round(ref)))
                area.append(np.abs(np.round(ref) - cv2.resize(im, size[::-1],
                                                              interpolation=cv2.INTER_AREA)))
            area = np.concatenate([a.ravel() for a in area])
            print(f"{name} -> {size[1]}x{size[0]}: onnxruntime vs torch, exclude_outside=1 "
                  f"{max(ex1):.1e}, =0 {max(ex0):.1f} levels; uint8 Resize shift "
                  f"{np.mean(shift):+.3f}; antialiased vs cv2 area: mean {area.mean():.2f}, "
                  f"99th percentile {np.percentile(area, 99):.0f}, largest {area.max():.0f}")


def effect(path, scale):
    """Mask differences and scores of a checkpoint with each resize on its held-out images."""
    model, ckpt = predict.load_model(path, device_lib.Compute(torch.device("cpu")))
    size = tuple(ckpt["settings"]["image_size"])
    module = predict.ImageProbability([model], [predict.input_settings(ckpt)])
    splits = load_dataset.run_splits(ckpt)
    rows = []
    for pair in splits["test"] + splits["valid"]:
        image = preprocess.read_image(pair.image)
        truth = preprocess.read_mask(pair.mask)
        if scale > 1:
            image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
            truth = cv2.resize(truth, image.shape[1::-1], interpolation=cv2.INTER_NEAREST)
        smalls = [preprocess.resize_pair(image, None, size, "area")[0],
                  np.round(torch_resize(image, size)).astype(np.uint8)]
        masks = []
        for small in smalls:
            with torch.inference_mode():
                net = module.network_probability(0, preprocess.to_tensor(
                    small, ckpt["settings"]["mean"], ckpt["settings"]["std"])[None])
            masks.append(preprocess.prob_to_original(net[0], truth.shape) >= 0.5)
        rows.append([np.mean(masks[0] != masks[1])] + [
            metrics.scores(*metrics.confusion(m, truth > 0))[k] for m in masks
            for k in ("iou", "threshold_jaccard")])
    r = np.array(rows)
    print(f"{path} x{scale}, {len(rows)} held-out images: mask pixels differing mean "
          f"{r[:, 0].mean():.2%} (worst {r[:, 0].max():.2%}); IoU area {r[:, 1].mean():.4f} "
          f"antialiased {r[:, 3].mean():.4f}; thresholded Jaccard {r[:, 2].mean():.4f} -> "
          f"{r[:, 4].mean():.4f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=DATA, help="the real images to resize")
    p.add_argument("--checkpoint", help="a model of --data whose masks to compare")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    facts(args.data)
    if args.checkpoint:
        for scale in (1, 4):
            effect(args.checkpoint, scale)
    return 0


if __name__ == "__main__":
    sys.exit(main())
