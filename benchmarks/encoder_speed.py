"""Training images per second of encoders and batch sizes, measured before a full run is paid
for: the step train_model.py takes (engine.train_one_epoch, the FPN, Adam, the Dice loss), in
its CPU precision (bfloat16 autocast and channels_last where the CPU has native bf16), on
random batches held in memory, so only the network's step is timed.

    OMP_NUM_THREADS=1 python benchmarks/encoder_speed.py                 # the defaults below
    OMP_NUM_THREADS=1 python benchmarks/encoder_speed.py --encoders resnet18 resnet34 \\
        --batch-sizes 8 --size 128 128 --rounds 5

Every round times every (encoder, batch size) once, in an order that turns from round to
round, after one untimed warm-up step each; the figures are the median images/s over the
rounds and the ratio to the first pair's images/s in the same round (median, min to max).
"Epochs in the time of 13" says how many epochs of that pair take the time of the CPU recipe's
13 epochs of the first pair. Shared machines are noisy: the load average is printed.
"""
import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pipeline  # noqa: E402  (the training step as train_model.py takes it)

ENCODERS = ("resnet18", "resnet34", "mobilenet_v2", "efficientnet-b0", "tu-regnety_004")
# mobileone_s0 is left out: its bfloat16 training step ended this process with "free(): invalid
# size" (torch 2.14.1 CPU)
BATCH_SIZES = (8,)
RECIPE_EPOCHS = 13  # the CPU recipe's epochs (README)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoders", nargs="+", default=list(ENCODERS))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=list(BATCH_SIZES))
    p.add_argument("--size", nargs=2, type=int, default=(128, 128), metavar=("H", "W"))
    p.add_argument("--steps", type=int, default=6, help="timed steps per pair and round")
    p.add_argument("--rounds", type=int, default=5)
    return p.parse_args(argv)


def batches(batch, size, seed=0):
    """Random images and 0/1 masks, as the loader yields them (normalised float, NCHW)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, *size, generator=g)
    masks = (torch.rand(batch, 1, *size, generator=g) > 0.5).float()
    while True:
        yield images, masks


def time_pair(job, steps, precision):
    model, optimizer, loss_fn, data = job
    model.train()
    pipeline.train_steps(model, optimizer, loss_fn, data, 1, precision)  # warm-up
    images, seconds = pipeline.train_steps(model, optimizer, loss_fn, data, steps, precision)
    return images / seconds


def main(argv=None):
    args = parse_args(argv)
    precision = pipeline.default_precision()
    pairs = [(e, b) for e in args.encoders for b in args.batch_sizes]
    jobs = {}
    for encoder, batch in pairs:
        model, optimizer, loss_fn = pipeline.new_default_training(encoder)
        jobs[encoder, batch] = (model, optimizer, loss_fn, batches(batch, args.size))
    print(f"training step of an FPN at {args.size[0]}x{args.size[1]}, {precision}, "
          f"{torch.get_num_threads()} thread(s), {args.rounds} rounds of {args.steps} steps; "
          f"load average {os.getloadavg()[0]:.1f}")
    speed = {p: [] for p in pairs}
    for r in range(args.rounds):
        for k in range(len(pairs)):
            pair = pairs[(k + r) % len(pairs)]
            speed[pair].append(time_pair(jobs[pair], args.steps, precision))
    first = pairs[0]
    print(f"\n| encoder | batch | images/s | vs {first[0]} batch {first[1]} (median, min-max) "
          f"| epochs in the time of {RECIPE_EPOCHS} |")
    print("| --- | --- | --- | --- | --- |")
    for pair in pairs:
        ratios = [a / b for a, b in zip(speed[pair], speed[first])]
        ratio = statistics.median(ratios)
        print(f"| {pair[0]} | {pair[1]} | {statistics.median(speed[pair]):.1f} | {ratio:.2f} "
              f"({min(ratios):.2f}-{max(ratios):.2f}) | {RECIPE_EPOCHS * ratio:.1f} |")
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
