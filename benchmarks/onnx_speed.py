"""End-to-end speed of exported models on the CPU: the float32 and the int8 graph of
export_model.py against PyTorch as `test_model.py --image` runs a .pth checkpoint (training's
OpenCV resize, the network in bfloat16 with channels_last on a CPU with native bf16,
OpenCV's linear resize back: evaluate.network_prediction), per image size.

    OMP_NUM_THREADS=1 python benchmarks/onnx_speed.py                # both models, 5 rounds
    python benchmarks/onnx_speed.py --models recipe --recipe-checkpoint Model/fpn_resnet18.pth

Models: "default", the paper's default run (se_resnext50_32x4d at 320x320), and "recipe", the
CPU recipe's resnet18 at 128x128, untrained unless --recipe-checkpoint names a trained one
(speed does not depend on the weights). Each is exported by `python export_model.py --int8`
(calibrated on --data's training split; the int8 file's metadata holds its measured
difference from the float32 graph on the validation split, printed beside the speed; an
untrained network's masks mean nothing, so only its share of differing mask pixels counts).
Each generated ISIC-sized JPEG (as benchmarks/pipeline.py writes them) is decoded once as
test_model.py decodes it, at the reduced scale (1/2 to 1/8) whose sides still cover the network
size (--full-decode: whole); every round times every image once each way, from that decoded
uint8 image to the 0/255 mask at the size in the JPEG's header (the graphs' output_size), the
three ways in an order that turns from round to round. The figures are
images per second per size (median over rounds) and the ratios to PyTorch per round, their
median and spread (min to max). Shared machines are noisy: the load average is printed.
docs/speed.md shows a run.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import device as device_lib  # noqa: E402
import evaluate  # noqa: E402
import onnx_format  # noqa: E402
import pipeline  # noqa: E402  (its JPEG generator and untrained checkpoint)
import predict  # noqa: E402
import preprocess  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# train_model.py's default run (pipeline.TRAIN, from `train_model.py --print-settings`)
TRAIN = pipeline.TRAIN
MODELS = {"default": (TRAIN.ENCODER, TRAIN.IMAGE_SIZE),  # train_model.py's defaults
          "recipe": ("resnet18", (128, 128))}           # the CPU recipe (docs/results.md)
# training images for the int8 calibration
DATA = str(REPO.parent / "shared" / "data" / "isic2018_task1_sample")
SIZES = [(1024, 768), (2048, 1536), (3008, 2000), (4000, 3000)]  # (width, height) JPEGs
ROUNDS = 5  # each round times every image once each way
IMAGES_SEED = 0  # of the generated images
WAYS = ("pytorch", "float32", "int8")
GOAL = 1.5  # a graph at least this many times PyTorch's images/s at every size


def generated_jpegs(folder):
    """The generated ISIC-sized JPEGs, (path, (height, width)) each."""
    tasks = [(w, h, Path(folder) / f"ISIC_{i:07d}.jpg", Path(folder) / f"ISIC_{i:07d}_m.png",
              [IMAGES_SEED, i]) for i, (w, h) in enumerate(SIZES)]
    for task in tasks:
        pipeline._write_pair(task)
    return [(task[2], (task[1], task[0])) for task in tasks]


def decoded(jpegs, decode_hw, full):
    """[(uint8 image, (height, width) of the outputs)]: each JPEG decoded once, as
    test_model.py decodes it (at the reduced scale the network size allows, the outputs at
    the size in its header), or whole with `full`."""
    return [(preprocess.read_image(path, min_hw=None if full else decode_hw), hw)
            for path, hw in jpegs]


def checkpoint_of(name, args, folder):
    """The checkpoint to time: --recipe-checkpoint for "recipe" where given, else an
    untrained network whose record names --data (for the calibration)."""
    if name == "recipe" and args.recipe_checkpoint:
        return Path(args.recipe_checkpoint), True
    encoder, size = MODELS[name]
    path = Path(folder) / f"{name}.pth"
    _, ckpt = pipeline.untrained_checkpoint(None, encoder, size)
    ckpt["settings"]["data"] = str(Path(args.data).resolve())
    torch.save(ckpt, path)
    return path, False


def export(path, out, trained):
    """`python export_model.py --int8` of one checkpoint; an untrained network's int8 file is
    kept whatever its IoU (it has none worth keeping)."""
    cmd = [sys.executable, str(REPO / "export_model.py"), "--checkpoint", str(path), "--out",
           str(out), "--int8"] + ([] if trained else ["--int8-max-iou-loss", "1"])
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        sys.exit(f"export_model.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return out, out.with_name(out.stem + "_int8.onnx")


def measure(ways, images, rounds):
    """Seconds [round][image] of each way; the order of the ways turns each round."""
    for fn in ways.values():  # warm up: first calls allocate and pick kernels
        fn(*images[0])
    seconds = {name: np.zeros((rounds, len(images))) for name in ways}
    names = list(ways)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for i, image in enumerate(images):
            for name in order:
                start = time.perf_counter()
                ways[name](*image)
                seconds[name][r, i] = time.perf_counter() - start
    return seconds


def spread(values, digits=2):
    return (f"{np.median(values):.{digits}f} ({np.min(values):.{digits}f} to "
            f"{np.max(values):.{digits}f})")


def report(seconds, images):
    """(lines, {graph: worst per-size median ratio}): per size the median images/s of each
    way and the graphs' ratios to PyTorch (median and spread over rounds)."""
    lines, worst = [], {}
    for i, (image, hw) in enumerate(images):
        rate = {name: 1.0 / seconds[name][:, i] for name in seconds}
        ratios = {name: rate[name] / rate["pytorch"] for name in seconds if name != "pytorch"}
        for name, ratio in ratios.items():
            worst[name] = min(worst.get(name, np.inf), float(np.median(ratio)))
        lines.append(f"  {hw[1]}x{hw[0]}  " + "  ".join(
            f"{name} {np.median(rate[name]):.2f}/s" for name in seconds) + "  |  " + "  ".join(
            f"{name}/pytorch {spread(ratio)}" for name, ratio in ratios.items()))
    return lines, worst


def pytorch_way(predictor, threshold, path):
    """The mask of a decoded image at (height, width) `hw` as `test_model.py --image` makes it
    with a .pth checkpoint (evaluate.image_prediction after the decode): training's OpenCV
    resize, the network, OpenCV's linear resize back, the threshold."""
    def way(image, hw):
        x = preprocess.network_input(image, predictor.settings)
        prob = evaluate.network_prediction(predictor, x, path, True, hw)[0]
        return np.where(preprocess.binarise(prob, threshold), 255, 0).astype(np.uint8)
    return way


def time_model(name, args, tmp, jpegs):
    """The lines of one model: export, timing, the int8 check."""
    path, trained = checkpoint_of(name, args, tmp)
    float_path, int8_path = export(path, Path(tmp) / f"{name}.onnx", trained)
    compute = device_lib.Compute(torch.device("cpu"), TRAIN.MIXED_PRECISION,
                                 TRAIN.CHANNELS_LAST)  # as test_model.py runs
    predictor = predict.load_predictor([str(path)], None, compute)
    threshold = float(predictor.ckpt["settings"]["threshold"])
    images = decoded(jpegs, predictor.decode_hw, args.full_decode)
    sessions = {"float32": predict.onnx_session(float_path),
                "int8": predict.onnx_session(int8_path)}
    ways = {"pytorch": pytorch_way(predictor, threshold, jpegs[0][0])}
    ways.update({k: (lambda s: lambda im, hw: s.run(["mask"], {
        "image": im, "output_size": np.array(hw, np.int64)})[0])(s)
        for k, s in sessions.items()})
    seconds = measure(ways, images, args.rounds)
    lines, worst = report(seconds, images)
    check = json.loads(onnx_format.read_metadata(int8_path)["int8_check"])
    s = predictor.ckpt["settings"]
    head = (f"{s['arch']} {s['encoder']} at {s['image_size'][0]}x{s['image_size'][1]} "
            f"({'trained: ' + str(path) if trained else 'untrained'}); int8 vs float32 on "
            f"{check['images']} validation images: {check['mask_pixels_differing']:.3%} of mask "
            f"pixels differ" + (f", IoU {check['iou_float32']:.4f} -> {check['iou_int8']:.4f}, "
                                f"thresholded Jaccard {-check['threshold_jaccard_loss']:+.4f}"
                                if trained else ""))
    best = max(worst, key=worst.get)
    goal = (f"  goal: a graph >= {GOAL}x PyTorch at every size: "
            f"{'met' if worst[best] >= GOAL else 'not met'} ({best}, worst size "
            f"{worst[best]:.2f}x)")
    return [head] + lines + [goal]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--recipe-checkpoint", help="a trained checkpoint of the CPU recipe")
    p.add_argument("--data", default=DATA, help="images for the int8 calibration and check")
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--full-decode", action="store_true",
                   help="decode each JPEG whole, not at test_model.py's reduced scale")
    return p.parse_args(argv)


def main(argv=None):
    import onnxruntime as ort
    args = parse_args(argv)
    load = os.getloadavg()[0]
    lines = [f"CPU, {os.cpu_count()} cores; torch {torch.__version__} with "
             f"{torch.get_num_threads()} threads, PyTorch in "
             f"{device_lib.precision_line(torch.device('cpu'), True, True)}; onnxruntime "
             f"{ort.__version__} with as many threads; {args.rounds} rounds; JPEGs decoded "
             f"{'whole' if args.full_decode else 'as test_model.py decodes them'}; images/s "
             f"per size "
             f"(median over rounds), ratio to PyTorch per round: median (min to max)"]
    with tempfile.TemporaryDirectory(prefix="onnx-speed-") as tmp:
        jpegs = generated_jpegs(tmp)
        for name in args.models:
            lines += time_model(name, args, tmp, jpegs)
            print("\n".join(lines), flush=True)
            lines = []
    print(f"load average (1 min) {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
