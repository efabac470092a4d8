"""End-to-end speed of an exported model: onnxruntime against PyTorch as test_model.py runs it.

    python benchmarks/onnx_speed.py                                   # ENCODER at IMAGE_SIZE
    python benchmarks/onnx_speed.py --encoder resnet18 --image-size 96 96   # the demo's model
    python benchmarks/onnx_speed.py --checkpoint Model/demo/demo_fpn_resnet18.pth --tta flips

Each generated ISIC-sized JPEG (as benchmarks/pipeline.py writes them) is decoded once; then
both ways are timed from the decoded uint8 image to the mask at the image's size: PyTorch
through the functions of the modules test_model.py runs (preprocess.resize_pair's cv2 area
resize, preprocess.to_tensor's normalisation, predict.predict_batch's network and views,
preprocess.prob_to_original's linear resize back, preprocess.binarise, the 0/255 mask) and
the single ONNX graph that `python export_model.py` writes (run as a subprocess, as a user
runs it; its time includes Python's start-up). Every round times every image once each way,
in alternating order; the figures are images per second per round, their median and spread
(min to max), and the ratio. The untrained network (no checkpoint given) runs as fast as a
trained one. docs/speed.md and docs/deployment.md show a run.
"""
import argparse
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
import pipeline  # noqa: E402  (its JPEG generator and untrained checkpoint)
import predict  # noqa: E402
import preprocess  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# train_model.py's default run (pipeline.TRAIN, from `train_model.py --print-settings`) is
# the network timed unless --checkpoint names one; test_model.py's MIXED_PRECISION and
# CHANNELS_LAST, which --pytorch default runs in, are the same as train_model.py's
TRAIN = pipeline.TRAIN

SIZES = [(1024, 768), (2048, 1536), (3008, 2000), (4000, 3000)]  # (width, height) JPEGs
ROUNDS = 5  # each round times every image once with each runtime
IMAGES_SEED = 0  # of the generated images


def untrained_checkpoint(folder, encoder, size_hw):
    """A checkpoint of an untrained network (speed does not depend on the weights)."""
    path = Path(folder) / f"{encoder}.pth"
    pipeline.untrained_checkpoint(path, encoder, size_hw)
    return path


def decoded_images(folder):
    """The generated JPEGs, each decoded whole once (the timed ways start from these)."""
    tasks = [(w, h, Path(folder) / f"ISIC_{i:07d}.jpg", Path(folder) / f"ISIC_{i:07d}_m.png",
              [IMAGES_SEED, i]) for i, (w, h) in enumerate(SIZES)]
    for task in tasks:
        pipeline._write_pair(task)
    return [preprocess.read_image(task[2]) for task in tasks]


def pytorch_mask(members, image, tta, threshold, compute):
    """The 0/255 mask test_model.py writes (metrics.predicted_mask, evaluate.to_png_mask)."""
    prob = predict.decoded_probability(members, image, compute, tta)
    return np.where(preprocess.binarise(prob, threshold), 255, 0).astype(np.uint8)


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(members, session, images, tta, rounds, precision):
    """Seconds [round][image] for each runtime; alternating which goes first. `precision`:
    (threshold, device.Compute) of the PyTorch path."""
    threshold, compute = precision
    ways = {"pytorch": lambda im: pytorch_mask(members, im, tta, threshold, compute),
            "onnxruntime": lambda im: session.run(["mask"], {"image": im})[0]}
    for fn in ways.values():  # warm up: first calls allocate and pick kernels
        fn(images[0])
    seconds = {name: np.zeros((rounds, len(images))) for name in ways}
    for r in range(rounds):
        order = list(ways) if r % 2 == 0 else list(ways)[::-1]
        for i, image in enumerate(images):
            for name in order:
                seconds[name][r, i] = timed(lambda: ways[name](image))
    return seconds


def spread(values, digits=2):
    return (f"{np.median(values):.{digits}f} ({np.min(values):.{digits}f} to "
            f"{np.max(values):.{digits}f})")


def report(seconds, images, header):
    per_round = {name: len(images) / s.sum(axis=1) for name, s in seconds.items()}
    ratio = per_round["onnxruntime"] / per_round["pytorch"]
    lines = header + [
        "images/s per round, median (min to max):",
        f"  PyTorch      {spread(per_round['pytorch'])}",
        f"  onnxruntime  {spread(per_round['onnxruntime'])}",
        f"  ratio onnxruntime / PyTorch  {spread(ratio)}",
        "seconds per image by size, median over rounds (PyTorch, onnxruntime, ratio):"]
    for i, image in enumerate(images):
        a = np.median(seconds["pytorch"][:, i])
        b = np.median(seconds["onnxruntime"][:, i])
        lines.append(f"  {image.shape[1]}x{image.shape[0]}  {a:.3f} s  {b:.3f} s  "
                     f"{a / b:.2f}x")
    return lines, float(np.median(ratio))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", nargs="+", default=None,
                   help="checkpoint(s) to export and time; default: an untrained --encoder")
    p.add_argument("--encoder", default=TRAIN.ENCODER)
    p.add_argument("--image-size", type=int, nargs=2, default=TRAIN.IMAGE_SIZE,
                   metavar=("H", "W"))
    p.add_argument("--tta", default="none", choices=predict.TTA_MODES,
                   help="test-time views (export_model.py says which the graph can hold)")
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--pytorch", choices=("float32", "default"), default="float32",
                   help="PyTorch in float32, as the graph computes, or in test_model.py's "
                        "precision on this machine (bfloat16 with channels_last on a CPU "
                        "with native bf16)")
    return p.parse_args(argv)


def export(paths, tta, out):
    """Seconds of `python export_model.py` writing the ONNX file of `paths` to `out`."""
    cmd = [sys.executable, str(REPO / "export_model.py"), "--checkpoint", *map(str, paths),
           "--tta", tta, "--out", str(out)]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        sys.exit(f"export_model.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def pytorch_compute(choice):
    """The device.Compute of the PyTorch path: float32 (as the graph computes), or
    test_model.py's default precision on this CPU."""
    cpu = torch.device("cpu")
    if choice == "default":
        return device_lib.Compute(cpu, TRAIN.MIXED_PRECISION, TRAIN.CHANNELS_LAST)
    return device_lib.Compute(cpu)


def run(args, tmp):
    """(members, images, seconds, export seconds, largest probability difference)."""
    paths = args.checkpoint or [untrained_checkpoint(tmp, args.encoder,
                                                     tuple(args.image_size))]
    out = Path(tmp) / "model.onnx"
    export_s = export(paths, args.tta, out)
    compute = pytorch_compute(args.pytorch)
    # in channels_last where the Compute uses it, as predict.load_model places the model
    members = predict.load_predictor(list(map(str, paths)), None, compute).members
    session = predict.onnx_session(out)  # as many threads as torch
    threshold = float(members[0][1]["settings"]["threshold"])
    images = decoded_images(tmp)
    seconds = measure(members, session, images, args.tta, args.rounds, (threshold, compute))
    worst = max(float(np.abs(session.run(["probability"], {"image": im})[0]
                             - predict.decoded_probability(members, im, compute, args.tta)).max())
                for im in images)
    return members, images, seconds, export_s, worst


def main(argv=None):
    import onnxruntime as ort

    args = parse_args(argv)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="onnx-speed-") as tmp:
        members, images, seconds, export_s, worst = run(args, tmp)
    compute = pytorch_compute(args.pytorch)
    runs = [c["settings"] for _, c, _ in members]
    size = runs[0]["image_size"]
    precision = device_lib.precision_line(compute.device, compute.mixed_precision,
                                          compute.channels_last_setting)
    header = [
        f"{', '.join(r['arch'] + ' ' + r['encoder'] for r in runs)} at {size[0]}x{size[1]}, "
        f"views {args.tta}, PyTorch in {precision}, onnxruntime in float32, on the CPU "
        f"({os.cpu_count()} cores; torch "
        f"{torch.__version__} with {torch.get_num_threads()} threads, onnxruntime "
        f"{ort.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})",
        f"{len(images)} decoded JPEGs ({', '.join(f'{w}x{h}' for w, h in SIZES)}), "
        f"{args.rounds} rounds; export (python export_model.py, start-up included) took "
        f"{export_s:.0f} s",
        f"largest probability difference between the two on these images: {worst:.1e}",
        f"load average (1 min) {load_start[0]:.2f} at the start, {os.getloadavg()[0]:.2f} "
        f"at the end"]
    lines, ratio = report(seconds, images, header)
    lines.append(f"goal onnxruntime >= 1.5x PyTorch: {'met' if ratio >= 1.5 else 'not met'} "
                 f"(median ratio {ratio:.2f})")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
