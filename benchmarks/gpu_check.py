"""GPU check: training images/s at 320x320 in float32 and in mixed precision + channels_last,
the cached loader's images/s with its default workers, whether the loader keeps up, and how
much longer validation at each image's original size takes than at network size.

    python benchmarks/gpu_check.py               # on a CUDA machine
    python benchmarks/gpu_check.py --cpu-smoke   # the same code path, shrunk, on a CPU

With no CUDA device it shrinks itself to the CPU smoke run and says so. The training step and
validation timed are the project's own (engine.train_one_epoch and engine.validate, through
benchmarks/pipeline.py's train_steps and measure_validation), with train_model.py's default
run (the block of constants in benchmarks/pipeline.py, which these measures use) and the
project's loaders (load_dataset.make_loader), on generated images in a temporary folder.
The last line is one JSON object. No run on a GPU has been recorded yet, so neither its
figures nor how long it takes are known; docs/speed.md says how to run it.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

# benchmarks/pipeline.py, beside this file; importing it puts the repository on sys.path.
# Its block of constants is train_model.py's default run: what this check measures on a GPU.
from pipeline import (SIZE_CYCLE, TRAIN, ImageSet, Precision, build_cache,
                      make_train_loader, measure_validation, new_training, next_epoch,
                      timed_pass, train_steps, write_set)

import device as device_lib  # noqa: E402  (pipeline put the repository on sys.path)
import engine  # noqa: E402

# valid_images: the ISIC-size mix of the validation measure (two cycles of pipeline's mix);
# valid_encoder: the same model as pipeline.py's validation measure
GPU = dict(encoder=TRAIN.ENCODER, size=TRAIN.IMAGE_SIZE, batch=TRAIN.BATCH_SIZE, steps=60,
           warmup=10, images=768, source=(1024, 768), loader_seconds=8.0,
           valid_images=SIZE_CYCLE * 2, valid_encoder="resnet18", valid_rounds=4)
CPU_SMOKE = dict(encoder="resnet18", size=(128, 128), batch=4, steps=3, warmup=1, images=24,
                 source=(640, 480), loader_seconds=2.0,
                 valid_images=sorted(set(SIZE_CYCLE)), valid_encoder="resnet18", valid_rounds=2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true",
                   help="small CPU run of the same code (automatic when CUDA is absent)")
    p.add_argument("--encoder", default=None, help=f"default {GPU['encoder']} on GPU")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="default 320 320 on GPU")
    p.add_argument("--batch", type=int, default=None, help=f"default {GPU['batch']} on GPU")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per mode")
    p.add_argument("--workers", type=int, default=TRAIN.WORKERS,
                   help="loader workers (default WORKERS, train_model.py's)")
    return p.parse_args(argv)


def setup(args):
    """(config, Precision), with one line saying what runs where. The device and cuDNN are
    set up as train_model.py sets them up (device.prepare)."""
    compute = device_lib.prepare("cpu" if args.cpu_smoke else "auto", TRAIN.MIXED_PRECISION,
                                 TRAIN.CHANNELS_LAST, TRAIN.CUDNN_BENCHMARK)
    cuda = compute.device.type == "cuda"
    cfg = dict(GPU if cuda else CPU_SMOKE)
    for key in ("encoder", "batch", "steps"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    cfg["size"] = tuple(args.size or cfg["size"])
    if cuda:
        name = torch.cuda.get_device_name()
        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16 + GradScaler"
        print(f"GPU check on {name}, torch {torch.__version__}, mixed precision = {dtype}, "
              f"cudnn.benchmark = {TRAIN.CUDNN_BENCHMARK}, float32 convolutions may use "
              f"TF32 (torch.backends.cudnn.allow_tf32 = {torch.backends.cudnn.allow_tf32})")
    else:
        why = "--cpu-smoke" if args.cpu_smoke else "no CUDA device"
        line = device_lib.precision_line(compute.device, TRAIN.MIXED_PRECISION,
                                         TRAIN.CHANNELS_LAST)
        print(f"CPU SMOKE RUN ({why}): shrunk to {cfg['encoder']} at {cfg['size'][0]}x"
              f"{cfg['size'][1]}, batch {cfg['batch']}, {cfg['steps']} steps; this checks the "
              f"code path only, the figures are not GPU figures (the CPU computes in "
              f"{line}, "
              f"as in train_model.py)")
    return cfg, Precision.of(compute)


def training_rate(encoder, batches, steps, warmup, precision):
    """Images/s of the training step over batches already on the device; peak GPU memory (MB)."""
    device = precision.device
    model, optimizer, loss_fn = new_training(encoder, device=device)
    model.to(device)
    if precision.channels_last:
        model.to(memory_format=torch.channels_last)
    scaler = engine.make_scaler(device, precision.mixed)  # float16 autocast: a GradScaler
    cycle = (batches[i % len(batches)] for i in range(warmup + steps))
    train_steps(model, optimizer, loss_fn, cycle, warmup, precision, scaler)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    n, seconds = train_steps(model, optimizer, loss_fn, cycle, steps, precision, scaler)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0
    return n / seconds, peak, (model, optimizer, loss_fn, scaler)


def loader_rate(loader, min_seconds):
    timed_pass(loader)  # start the persistent workers
    images, seconds = 0, 0.0
    while seconds < min_seconds:
        n, t = timed_pass(loader)
        images, seconds = images + n, seconds + t
    return images / seconds


def measure_training(cfg, args, precision, tmp):
    """Loader, float32, mixed + channels_last and full-pipeline images/s on one image set."""
    device = precision.device
    pairs, _ = write_set(tmp, [cfg["source"]] * cfg["images"], seed=3)
    r = {"pairs": len(pairs), "build": build_cache(pairs, tmp, cfg["size"])}
    loader = make_train_loader(pairs, tmp, cfg["size"], cfg["batch"], True, args.workers,
                               device)
    r["loader_ips"] = loader_rate(loader, cfg["loader_seconds"])
    # batches of the real loader, moved to the device once: the model alone
    on_device = [(x.to(device), y.to(device), ids) for x, y, ids in
                 (b for _, b in zip(range(4), next_epoch(loader)) if b is not None)]
    r["fp32_ips"], r["fp32_mem"], state = training_rate(
        cfg["encoder"], on_device, cfg["steps"], cfg["warmup"], Precision(device))
    del state  # free the float32 model before the next one's peak memory is taken
    if device.type == "cuda":
        torch.cuda.empty_cache()
    r["amp_ips"], r["amp_mem"], state = training_rate(
        cfg["encoder"], on_device, cfg["steps"], cfg["warmup"], precision)
    # the full pipeline: the same (mixed, channels_last) model fed by the cached loader
    model, optimizer, loss_fn, scaler = state
    n, t = train_steps(model, optimizer, loss_fn, next_epoch(loader),
                       min(cfg["steps"], len(loader)), precision, scaler)
    r["pipe_ips"] = n / t
    return r


def report(cfg, args, r, v, precision, started):
    """The table, then the JSON line."""
    h, w = cfg["size"]
    cuda = precision.device.type == "cuda"
    amp_name = "mixed precision + channels_last" if cuda else \
        f"train_model.py's precision on this CPU ({'bf16' if precision.mixed else 'float32'})"
    rows = [
        (f"training {cfg['encoder']} {TRAIN.ARCH} {h}x{w}, batch {cfg['batch']}, float32",
         r["fp32_ips"],
         f"peak {r['fp32_mem']:.0f} MB" if cuda else ""),
        (f"training, {amp_name}", r["amp_ips"], f"peak {r['amp_mem']:.0f} MB" if cuda else ""),
        (f"loader from the cache, {args.workers} workers"
         f"{' (train_model.py WORKERS)' if args.workers == TRAIN.WORKERS else ''}, augment",
         r["loader_ips"], f"cache built at {r['pairs'] / r['build']:.0f} images/s"),
        ("full pipeline: cached loader + the mixed/channels_last step", r["pipe_ips"], ""),
        (f"validation {cfg['valid_encoder']} {TRAIN.ARCH} {h}x{w} at network size (+ loss, "
         f"batch_confusion)", v["network_ips"], f"{v['network_s']:.2f} s"),
        ("validation at original size (engine.validate's loop)", v["original_ips"],
         f"{v['original_s']:.2f} s, {v['images']} ISIC-size images"),
    ]
    print(f"{'measure':<74}{'images/s':>10}")
    for label, ips, note in rows:
        print(f"{label:<74}{ips:>10.1f}  {note}")
    ratio = r["loader_ips"] / r["amp_ips"]
    share = r["pipe_ips"] / r["amp_ips"]
    for label, value in (
            ("speed-up of mixed precision + channels_last over float32",
             f"{r['amp_ips'] / r['fp32_ips']:.2f}"),
            ("loader / training (mixed): >= 1 means the loader keeps up", f"{ratio:.2f}"),
            ("pipeline share (full pipeline / training alone, mixed)", f"{share:.3f}"),
            ("validation, original size / network size (seconds): target <= 2",
             f"{v['ratio']:.3f}")):
        print(f"{label:<74}{value:>10}")
    print(f"({time.time() - started:.0f} s; {os.cpu_count()} CPU cores)")
    print(json.dumps({
        "device": torch.cuda.get_device_name() if cuda else "cpu-smoke",
        "encoder": cfg["encoder"], "size": list(cfg["size"]), "batch": cfg["batch"],
        "workers": args.workers, "train_fp32_ips": round(r["fp32_ips"], 2),
        "train_amp_cl_ips": round(r["amp_ips"], 2), "loader_ips": round(r["loader_ips"], 1),
        "pipeline_ips": round(r["pipe_ips"], 2),
        "amp_speedup": round(r["amp_ips"] / r["fp32_ips"], 3),
        "loader_over_train": round(ratio, 3), "pipeline_share": round(share, 3),
        "valid_encoder": cfg["valid_encoder"], "valid_network_ips": round(v["network_ips"], 2),
        "valid_original_ips": round(v["original_ips"], 2),
        "valid_original_over_network": round(v["ratio"], 3),
        "peak_mb": {"fp32": round(r["fp32_mem"]), "amp": round(r["amp_mem"])},
        "seconds": round(time.time() - started, 1)}))


def main(argv=None):
    args = parse_args(argv)
    cfg, precision = setup(args)
    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        r = measure_training(cfg, args, precision, tmp / "train")
        mix, _ = write_set(tmp / "mix", cfg["valid_images"], seed=4)
        v = measure_validation(ImageSet(mix, tmp / "mix", cfg["size"], cfg["batch"],
                                        args.workers),
                               cfg["valid_encoder"], cfg["valid_rounds"], precision)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(cfg, args, r, v, precision, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
