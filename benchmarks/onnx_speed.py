"""End-to-end speed of an exported model: onnxruntime against PyTorch as test_model.py runs it.

    python benchmarks/onnx_speed.py                                   # ENCODER at IMAGE_SIZE
    python benchmarks/onnx_speed.py --encoder resnet18 --image-size 96 96   # the demo's model
    python benchmarks/onnx_speed.py --checkpoint Model/demo/resnet18.pth --tta flips

Each generated ISIC-sized JPEG (as benchmarks/pipeline.py writes them) is decoded once; then
both ways are timed from the decoded uint8 image to the mask at the image's size: PyTorch
through the functions test_model.py uses (cv2 area resize, normalisation, FPN, views, linear
resize back, threshold) and the single ONNX graph of export_model.py. Every round times every
image once each way, in alternating order; the figures are images per second per round, their
median and spread (min to max), and the ratio. The untrained network (no checkpoint given)
runs as fast as a trained one.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import export_model  # noqa: E402
import model as model_lib  # noqa: E402
import pipeline  # noqa: E402  (its JPEG generator)
import preprocess  # noqa: E402
import test_model  # noqa: E402

ENCODER = "se_resnext50_32x4d"  # train_model.py's default encoder ...
IMAGE_SIZE = (320, 320)  # ... and network size (height, width)
SIZES = [(1024, 768), (2048, 1536), (3008, 2000), (4000, 3000)]  # (width, height) JPEGs
ROUNDS = 5  # each round times every image once with each runtime
SEED = 0  # of the generated images and the untrained network


def untrained_checkpoint(folder, encoder, size_hw):
    """A checkpoint of an untrained FPN (speed does not depend on the weights)."""
    torch.manual_seed(SEED)
    net = model_lib.build_model(encoder, None, 5).eval()
    settings = {"encoder": encoder, "encoder_depth": 5, "image_size": size_hw,
                "threshold": 0.5}
    path = Path(folder) / f"{encoder}.pth"
    model_lib.save_checkpoint(model_lib.checkpoint_record(net, settings, 0, None), path)
    return path


def decoded_images(folder):
    """The generated JPEGs, each decoded whole once (the timed ways start from these)."""
    tasks = [(w, h, Path(folder) / f"ISIC_{i:07d}.jpg", Path(folder) / f"ISIC_{i:07d}_m.png",
              [SEED, i]) for i, (w, h) in enumerate(SIZES)]
    for task in tasks:
        pipeline._write_pair(task)
    return [preprocess.read_image(task[2]) for task in tasks]


def pytorch_mask(members, image, tta, threshold, precision=(False, False)):
    prob = export_model.torch_probability(members, image, tta, precision)
    return test_model.to_png_mask(test_model.finish_mask(prob, threshold, False))


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(members, session, images, tta, rounds, precision):
    """Seconds [round][image] for each runtime; alternating which goes first. `precision`:
    (threshold, (autocast?, channels_last?)) of the PyTorch path."""
    threshold, amp = precision
    ways = {"pytorch": lambda im: pytorch_mask(members, im, tta, threshold, amp),
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
    p.add_argument("--encoder", default=ENCODER)
    p.add_argument("--image-size", type=int, nargs=2, default=IMAGE_SIZE,
                   metavar=("H", "W"))
    p.add_argument("--tta", default="none", choices=export_model.TTAS)
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--pytorch", choices=("float32", "default"), default="float32",
                   help="PyTorch in float32, as the graph computes, or in test_model.py's "
                        "precision on this machine (bfloat16 with channels_last on a CPU "
                        "with native bf16)")
    return p.parse_args(argv)


def main(argv=None):
    import onnxruntime as ort

    args = parse_args(argv)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="onnx-speed-") as tmp:
        paths = args.checkpoint or [untrained_checkpoint(tmp, args.encoder,
                                                         tuple(args.image_size))]
        out = Path(tmp) / "model.onnx"
        started = time.perf_counter()
        export_model.export(export_model.parse_args(
            ["--checkpoint", *map(str, paths), "--tta", args.tta, "--out", str(out)]))
        export_s = time.perf_counter() - started
        members = test_model.load_predictor(list(map(str, paths)), None,
                                            torch.device("cpu")).members
        cpu = torch.device("cpu")
        amp = (False, False)
        if args.pytorch == "default":
            amp = (model_lib.autocast_dtype(cpu, test_model.MIXED_PRECISION) is not None,
                   model_lib.use_channels_last(cpu, test_model.CHANNELS_LAST,
                                               test_model.MIXED_PRECISION))
        if not amp[1]:
            members = [(net.to(memory_format=torch.contiguous_format), c, p)
                       for net, c, p in members]
        session = model_lib.onnx_session(out)  # as many threads as torch
        threshold = float(members[0][1].get("threshold", 0.5))
        images = decoded_images(tmp)
        seconds = measure(members, session, images, args.tta, args.rounds, (threshold, amp))
        worst = max(float(np.abs(session.run(["probability"], {"image": im})[0]
                                 - export_model.torch_probability(members, im, args.tta,
                                                                  amp)).max())
                    for im in images)
    ckpt = members[0][1]
    size = ckpt["image_size"]
    header = [
        f"FPN {', '.join(c['encoder'] for _, c, _ in members)} at {size[0]}x{size[1]}, "
        f"views {args.tta}, PyTorch in "
        f"{model_lib.precision_line(torch.device('cpu'), amp[0], amp[1])}, onnxruntime in "
        f"float32, on the CPU ({os.cpu_count()} cores; torch "
        f"{torch.__version__} with {torch.get_num_threads()} threads, onnxruntime "
        f"{ort.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})",
        f"{len(images)} decoded JPEGs ({', '.join(f'{w}x{h}' for w, h in SIZES)}), "
        f"{args.rounds} rounds; export took {export_s:.0f} s",
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
