"""Export a trained model to one ONNX file that takes a raw image and returns its mask.

    python export_model.py --checkpoint Model/demo/demo_fpn_resnet18.pth   # -> ...resnet18.onnx
    python export_model.py --checkpoint Model/ --tta flips           # an ensemble, flipped views
    python export_model.py --checkpoint Model/fpn_resnet18.pth --int8  # also ...resnet18_int8.onnx
    python export_model.py --info Model/demo/demo_fpn_resnet18.onnx  # what a file holds

The graph's input is one RGB image, uint8 (H, W, 3), of any size; its outputs are the lesion
probability (H, W) float32 and the mask (H, W) uint8 0/255, both at the image's own size.
It is predict.ImageProbability, the module test_model.py runs, traced by torch.onnx: the
resize to each member's network size (one standard Resize node, linear with antialiasing),
the mean and std, the network over the test-time views, the sigmoid, the means, the linear
resize back; then the threshold. onnx_format.py holds the file's metadata and its versions.
With --int8, a second file holds the graph quantised to int8 (onnxruntime's static QDQ
quantisation, calibrated on the run's own training images), and its measured difference
from the float32 graph. Edit the constants below, or pass the matching flag.
"""
import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

import device as device_lib
import load_dataset
import onnx_format
import predict
import preprocess
import settings as settings_lib
from checkpoint import CheckpointError
from predict import UsageError
from settings import Setting, SettingError

# ----------------------------------------------------------------------------- settings
MODEL_DIR = "Model"
CHECKPOINT = None
OUT = None                         # None: <run name>.onnx beside the (first) checkpoint
TTA = "none"
THRESHOLD = None                   # None: the checkpoint's
OPSET = 20                         # antialiased Resize needs 18; onnxruntime >= 1.18 runs 20
CHECK_SIZE = (200, 300)            # (height, width), unlike any network size
INT8 = False                       # also write <out>_int8.onnx
CALIBRATION_IMAGES = 32            # training images the int8 ranges are measured on
INT8_MAX_IOU_LOSS = 0.005          # an int8 file losing more mean IoU is not kept

SETTINGS = [  # every one is a flag (settings.py)
    Setting("MODEL_DIR", "where the default checkpoint (the newest best model) is looked for"),
    Setting("CHECKPOINT", "checkpoint file(s) or folder(s); several: an ensemble in one graph",
            nargs="+", metavar="PATH"),
    Setting("OUT", "the ONNX file to write; default: <run name>.onnx beside the (first) "
            "checkpoint"),
    Setting("TTA", "test-time views inside the graph", choices=predict.TTA_MODES),
    Setting("THRESHOLD", "mask cut; default: the one stored in the (first) checkpoint",
            type=float),
    Setting("OPSET", "ONNX opset of the graph (18 or later)"),
    Setting("CHECK_SIZE", "(height, width) of the generated image the export is checked on "
            "against PyTorch", metavar=("H", "W")),
    Setting("INT8", "also write <out>_int8.onnx, quantised to int8 (docs/deployment.md)"),
    Setting("CALIBRATION_IMAGES", "training images of the (first) run the int8 ranges are "
            "calibrated on"),
    Setting("INT8_MAX_IOU_LOSS", "the int8 file is removed again where it loses more mean IoU "
            "than this on the run's validation split"),
]
# ---------------------------------------------------------------------------------------


class ImageToMask(torch.nn.Module):
    """What the graph computes: predict.ImageProbability, then the threshold."""

    def __init__(self, probability, threshold):
        super().__init__()
        self.probability, self.threshold = probability, float(threshold)

    def forward(self, image):
        prob = self.probability(image)
        # a cast and a uint8 product: torch.where(..., 255, 0) would be int64 at full size
        return prob, (prob >= self.threshold).to(torch.uint8) * 255


def trace(module, opset=OPSET):
    """ONNX ModelProto of ImageToMask for images of any height and width."""
    height = torch.export.Dim("height", min=2, max=30000)
    width = torch.export.Dim("width", min=2, max=30000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module.eval(), (torch.zeros(200, 300, 3, dtype=torch.uint8),),
                                    dynamo=True, opset_version=opset, input_names=["image"],
                                    output_names=["probability", "mask"], verbose=False,
                                    dynamic_shapes=({0: height, 1: width},))
    proto = program.model_proto
    for node in proto.graph.node:  # the tracer's notes (stack traces with local paths)
        del node.metadata_props[:]
    onnx_format.add_output_size(proto)
    onnx_format.global_pools(proto)
    onnx_format.planar_resizes_back(proto)
    return proto


def build(members, tta="none", threshold=None, opset=OPSET):
    """ONNX ModelProto of the whole way from image to mask for [(model, ckpt, path)], on the
    CPU in float32 whatever inference here runs in."""
    threshold = float(members[0][1]["settings"]["threshold"] if threshold is None
                      else threshold)
    if not 0.0 < threshold < 1.0:
        raise SettingError(f"THRESHOLD={threshold} must lie strictly between 0 and 1")
    if opset < 18:
        raise SettingError(f"OPSET={opset}: the antialiased Resize needs opset 18 or later")
    cpu = device_lib.Compute(torch.device("cpu"))
    nets = [(net.cpu().float().to(memory_format=torch.contiguous_format), c, p)
            for net, c, p in members]
    module = predict.Predictor(nets, cpu, tta).module
    proto = trace(ImageToMask(module, threshold), opset)
    records = [onnx_format.member_record(ckpt, path) for _, ckpt, path in members]
    onnx_format.set_metadata(proto, onnx_format.metadata(records, tta, threshold, opset))
    return proto


# ----------------------------------------------------------------------------- int8

def training_images(ckpt, count):
    """Up to `count` decoded images spread over the run's own training split."""
    pairs = load_dataset.run_splits(ckpt)["train"]
    if not pairs:
        raise UsageError(f"no training images under {ckpt['settings']['data']} to calibrate "
                         f"int8 on")
    picked = np.linspace(0, len(pairs) - 1, min(count, len(pairs))).astype(int)
    return [preprocess.read_image(pairs[i].image, exif=pairs[i].exif) for i in picked]


def int8_check(float_path, int8_path, pairs):
    """The int8 graph against the float32 one on `pairs`: the share of mask pixels that
    differ, and the mean IoU and thresholded Jaccard (against the true masks) of each."""
    import metrics
    runs = [predict.onnx_session(float_path), predict.onnx_session(int8_path)]
    differ, scores = [], [[], []]
    for pair in pairs:
        image, truth = preprocess.read_image(pair.image, exif=pair.exif), \
            preprocess.read_mask(pair.mask).astype(bool)
        masks = [run.run(["mask"], {"image": image})[0] > 0 for run in runs]
        differ.append(float(np.mean(masks[0] != masks[1])))
        for kept, mask in zip(scores, masks):
            kept.append(metrics.scores(*metrics.confusion(mask, truth)))
    mean = [{k: float(np.mean([s[k] for s in kept])) for k in ("iou", "threshold_jaccard")}
            for kept in scores]
    return {"images": len(pairs), "mask_pixels_differing": float(np.mean(differ)),
            "iou_float32": mean[0]["iou"], "iou_int8": mean[1]["iou"],
            "iou_loss": mean[0]["iou"] - mean[1]["iou"],
            "threshold_jaccard_loss": mean[0]["threshold_jaccard"]
            - mean[1]["threshold_jaccard"]}


def write_int8(float_path, ckpt, count, max_loss):
    """<float file>_int8.onnx, calibrated on the run's training images and checked on its
    validation split; removed again if it loses more than `max_loss` of mean IoU."""
    import onnx
    out = float_path.with_name(float_path.stem + "_int8.onnx")
    onnx_format.quantise(float_path, out, training_images(ckpt, count))
    check = int8_check(float_path, out, load_dataset.run_splits(ckpt)["valid"])
    proto = onnx.load(str(out))
    meta = onnx_format.read_metadata(float_path)
    onnx_format.set_metadata(proto, {**meta, "precision": "int8", "int8_check": json.dumps(check)})
    onnx.save_model(proto, str(out))
    print(f"int8: {check['images']} validation images: {check['mask_pixels_differing']:.3%} of "
          f"mask pixels differ from float32; IoU {check['iou_float32']:.4f} -> "
          f"{check['iou_int8']:.4f}, thresholded Jaccard loss "
          f"{check['threshold_jaccard_loss']:+.4f}")
    if check["iou_loss"] > max_loss:
        out.unlink()
        raise UsageError(f"the int8 graph loses {check['iou_loss']:.4f} of mean IoU (more than "
                         f"{max_loss}): not written; use the float32 file")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return out


def check_image(hw, seed=0):
    """A smooth random RGB image with a dark blob: something for the network to react to."""
    import cv2  # noqa: E401
    rng = np.random.default_rng(seed)
    field = rng.integers(60, 220, (hw[0] // 16 + 2, hw[1] // 16 + 2, 3), dtype=np.uint8)
    image = cv2.resize(field, hw[::-1], interpolation=cv2.INTER_CUBIC)
    cv2.ellipse(image, (hw[1] // 2, hw[0] // 2), (hw[1] // 4, hw[0] // 5), 20, 0, 360,
                (90, 50, 40), -1)
    return image


def info_lines(path):
    meta = onnx_format.read_metadata(path)
    lines = [f"{path}: made by export_model.py (format {meta['format']}, read as version "
             f"{meta['version']})"]
    lines += [f"  {key}: {meta[key]}" for key in onnx_format.KEYS[2:] + ("int8_check",)
              if key in meta and key not in ("sources", "members")]
    return lines + [f"  source: {s['file']} sha256 {s['sha256']}"
                    for s in json.loads(meta["sources"])]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    settings_lib.add_flags(p, SETTINGS, globals())
    p.add_argument("--info", metavar="FILE.onnx", help="print what an exported file holds")
    return settings_lib.parse(p, SETTINGS, globals(), argv)[0]


def export(args):
    import onnx
    if any(str(p).lower().endswith(".onnx") for p in args.checkpoint or []):
        raise UsageError("--checkpoint takes the .pth checkpoint(s) an ONNX file is exported "
                         "from; --info FILE.onnx shows an exported one")
    predictor = predict.load_predictor(args.checkpoint, args.model_dir,
                                       device_lib.Compute(torch.device("cpu")))
    out = Path(args.out) if args.out else Path(predictor.path).with_suffix(".onnx")
    proto = build(predictor.members, args.tta, args.threshold, args.opset)
    onnx.checker.check_model(proto, full_check=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with preprocess.atomic_write(out) as tmp:
        onnx.save_model(proto, str(tmp))
    image = check_image(args.check_size)
    prob = predict.onnx_session(out).run(["probability"], {"image": image})[0]
    diff = float(np.abs(prob - predict.Predictor(predictor.members, predictor.compute,
                                                 args.tta).probability(image)).max())
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, opset {args.opset}, views "
          f"{args.tta}) from {', '.join(str(p) for _, _, p in predictor.members)}; onnxruntime "
          f"vs PyTorch on a {args.check_size[1]}x{args.check_size[0]} image: largest "
          f"probability difference {diff:.1e}; use it: python test_model.py --checkpoint {out}")
    if args.int8:
        write_int8(out, predictor.ckpt, args.calibration_images, args.int8_max_iou_loss)
    return out


def main(argv=None):
    args = parse_args(argv)
    try:
        print("\n".join(info_lines(args.info))) if args.info else export(args)
        return 0
    except (UsageError, CheckpointError, SettingError, OSError) as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        sys.exit("\ninterrupted")


if __name__ == "__main__":
    sys.exit(main())
