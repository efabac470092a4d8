"""What `test_model.py --evaluate` costs beyond the prediction it scores.

    python benchmarks/evaluate_speed.py --checkpoint runs/fpn/fpn_resnet18_fold0.pth
    python benchmarks/evaluate_speed.py --checkpoint M.pth --tta flips --split valid

On one split of the checkpoint's data, in one process, alternating round by round:

- the bare loop: decode each image (preprocess.eval_input), predict it with the same members
  and test-time views (Predictor.batch, batches of --batch-size), bring the map back to the
  image's size, cut it and write the mask PNG (evaluate.write_mask); nothing else;
- the evaluation: evaluate.evaluate_split, what --evaluate runs (masks, every registry
  metric at the original size, confidence, thumbnails, per_image.csv, summary.json with its
  bootstrap intervals, report.html).

It prints seconds per image of each, the ratio of their rates (evaluation / bare; the
evaluation is meant to keep at least 0.8 of the bare loop's rate), and the forward passes per
image of each and of one image as `python test_model.py --image` predicts it (counted by a
hook on each member's forward: images pushed through the network / images). With one view
the expected figure is 1, with --tta flips 4. --boundary-size also times the boundary metrics
(HD95 and NSD) on a pair of generated masks of that size (default 6000x4000, the largest
ISIC images).
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import device as device_lib  # noqa: E402
import evaluate  # noqa: E402
import metrics  # noqa: E402
import predict  # noqa: E402
import preprocess  # noqa: E402


class Decoded(Dataset):
    """(network-size tensor, index, the image's (h, w)) of each pair, as --image decodes it."""

    def __init__(self, pairs, settings):
        self.pairs, self.settings = pairs, settings

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        tensor, hw = preprocess.eval_input(self.pairs[i].image, self.settings, self.pairs[i].exif)
        return tensor[0], i, hw


def bare_loop(predictor, pairs, out, args):
    """Decode, predict with the predictor's views, write each mask at its image's size."""
    loader = DataLoader(Decoded(pairs, predictor.settings), batch_size=args.batch_size,
                        num_workers=args.workers, collate_fn=lambda b: list(zip(*b)))
    out.mkdir(parents=True, exist_ok=True)
    for images, index, sizes in loader:
        chosen = [pairs[i] for i in index]
        for pair, prob, hw in zip(chosen, predictor.batch(torch.stack(images), chosen), sizes):
            pred = metrics.predicted_mask(prob, hw, args.threshold)
            evaluate.write_mask(evaluate.to_png_mask(pred), out / f"{pair.id}_segmentation.png")


def count_passes(predictor):
    """A list that receives the batch size of every forward call of every member."""
    seen = []
    for model, _, _ in predictor.members:
        model.register_forward_pre_hook(lambda module, inputs: seen.append(len(inputs[0])))
    return seen


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def boundary_cost(width, height, repeats=3):
    """Seconds of confusion counts and of HD95 + NSD on two overlapping ellipses."""
    truth = np.zeros((height, width), np.uint8)
    pred = np.zeros((height, width), np.uint8)
    centre, axes = (width // 2, height // 2), (int(width * 0.3), int(height * 0.3))
    cv2.ellipse(truth, centre, axes, 0, 0, 360, 1, -1)
    cv2.ellipse(pred, (centre[0] + width // 100, centre[1]), axes, 8, 0, 360, 1, -1)
    truth, pred = truth > 0, pred > 0
    counts = [timed(lambda: metrics.confusion(pred, truth)) for _ in range(repeats)]
    boundary = [timed(lambda: metrics.image_scores(pred, truth, ["hd95", "nsd"]))
                for _ in range(repeats)]
    return statistics.median(counts), statistics.median(boundary)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a .pth checkpoint of train_model.py")
    p.add_argument("--split", default="test", choices=("test", "valid", "train"))
    p.add_argument("--data", default=None, help="data folder; default: the checkpoint's")
    p.add_argument("--tta", default="none", choices=predict.TTA_MODES)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of each loop")
    p.add_argument("--boundary-size", type=int, nargs=2, default=(6000, 4000),
                   metavar=("W", "H"), help="mask size for timing HD95 and NSD; 0 0: skip")
    p.add_argument("--threshold", type=float, default=0.5)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    compute = device_lib.prepare("auto", True, True)
    predictor = predict.load_predictor([args.checkpoint], None, compute, args.tta)
    pairs = evaluate.load_split(predictor.ckpt, args.data, args.split)
    passes = count_passes(predictor)
    bare, full, counted = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            passes.clear()
            bare.append(timed(lambda: bare_loop(predictor, pairs, Path(tmp) / "bare", args)))
            counted["bare"] = sum(passes) / len(pairs)
            passes.clear()
            full.append(timed(lambda: evaluate.evaluate_split(
                predictor, pairs, Path(tmp) / f"eval{r}", args.threshold,
                evaluate.Scoring(args.split, args.data, args.batch_size, args.workers))))
            counted["evaluate"] = sum(passes) / len(pairs)
        passes.clear()
        evaluate.image_prediction(predictor, pairs[0].image, pairs[0].exif)
        counted["image"] = sum(passes)
    report(args, predictor, (pairs, bare, full), counted)


def report(args, predictor, timings, counted):
    pairs, bare, full = timings
    b, f = statistics.median(bare), statistics.median(full)
    print(f"\n{len(pairs)} images of the {args.split} split, {predictor.name()}, views "
          f"{args.tta}, device {predictor.device.type} (autocast: {predictor.compute.mixed}), "
          f"{torch.get_num_threads()} thread(s), {args.workers} loader worker(s); "
          f"median of {args.rounds} alternating rounds")
    print(f"bare loop (decode, predict, write masks): {b / len(pairs):.4f} s per image "
          f"(rounds {', '.join(f'{x:.2f}' for x in bare)} s)")
    print(f"evaluate_split (--evaluate):              {f / len(pairs):.4f} s per image "
          f"(rounds {', '.join(f'{x:.2f}' for x in full)} s)")
    print(f"rate ratio evaluation / bare loop: {b / f:.2f} (at least 0.8 expected)")
    print(f"forward passes per image: --evaluate {counted['evaluate']:.2f}, bare loop "
          f"{counted['bare']:.2f}, one image (--image) {counted['image']:.2f}")
    if all(args.boundary_size):
        counts, boundary = boundary_cost(*args.boundary_size)
        print(f"at {args.boundary_size[0]}x{args.boundary_size[1]}: confusion counts "
              f"{counts:.3f} s, HD95 + NSD {boundary:.3f} s per image")


if __name__ == "__main__":
    main()
