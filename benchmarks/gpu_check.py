"""GPU check: training images/s at 320x320 in float32 and in mixed precision + channels_last,
the cached loader's images/s with its default workers, and whether the loader keeps up.

    python benchmarks/gpu_check.py               # on a CUDA machine: 1 to 3 minutes
    python benchmarks/gpu_check.py --cpu-smoke   # the same code path, shrunk, on a CPU

With no CUDA device it shrinks itself to the CPU smoke run and says so. Everything runs through
train_model's own pieces (build_model, make_loaders, train_one_epoch, _autocast and the
MIXED_PRECISION / CHANNELS_LAST / CUDNN_BENCHMARK constants) on generated images in a temporary
folder. The last line is one JSON object.
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

# benchmarks/pipeline.py, beside this file; importing it puts the repository on sys.path
from pipeline import make_train_loader, new_training, timed_pass, train_steps, write_set

import preprocess  # noqa: E402  (pipeline put the repository on sys.path)
import load_dataset  # noqa: E402
import train_model  # noqa: E402

GPU = dict(encoder=train_model.ENCODER, size=(320, 320), batch=train_model.BATCH_SIZE,
           steps=60, warmup=10, images=768, source=(1024, 768), loader_seconds=8.0)
CPU_SMOKE = dict(encoder="resnet18", size=(128, 128), batch=4, steps=3, warmup=1, images=24,
                 source=(640, 480), loader_seconds=2.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true",
                   help="small CPU run of the same code (automatic when CUDA is absent)")
    p.add_argument("--encoder", default=None, help=f"default {GPU['encoder']} on GPU")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="default 320 320 on GPU")
    p.add_argument("--batch", type=int, default=None, help=f"default {GPU['batch']} on GPU")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per mode")
    p.add_argument("--workers", type=int, default=train_model.WORKERS,
                   help="loader workers (default train_model.WORKERS)")
    return p.parse_args(argv)


def training_rate(encoder, batches, steps, warmup, device, mixed, channels_last):
    """Images/s of train_one_epoch over batches already on the device; peak GPU memory (MB)."""
    model, optimizer, loss_fn = new_training(encoder)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    scaler = None
    if mixed and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        scaler = torch.amp.GradScaler("cuda")
    cycle = (batches[i % len(batches)] for i in range(warmup + steps))
    train_steps(model, optimizer, loss_fn, cycle, warmup, device, mixed, channels_last, scaler)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    n, seconds = train_steps(model, optimizer, loss_fn, cycle, steps, device, mixed,
                             channels_last, scaler)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0
    return n / seconds, peak, (model, optimizer, loss_fn, scaler)


def main(argv=None):
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    cfg = dict(GPU if cuda else CPU_SMOKE)
    for key in ("encoder", "batch", "steps"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.size:
        cfg["size"] = tuple(args.size)
    device = torch.device("cuda" if cuda else "cpu")
    started = time.time()
    if cuda:
        name = torch.cuda.get_device_name()
        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16 + GradScaler"
        torch.backends.cudnn.benchmark = train_model.CUDNN_BENCHMARK
        print(f"GPU check on {name}, torch {torch.__version__}, mixed precision = {dtype}, "
              f"cudnn.benchmark = {train_model.CUDNN_BENCHMARK}, float32 convolutions may use "
              f"TF32 (torch.backends.cudnn.allow_tf32 = {torch.backends.cudnn.allow_tf32})")
    else:
        why = "--cpu-smoke" if args.cpu_smoke else "no CUDA device"
        print(f"CPU SMOKE RUN ({why}): shrunk to {cfg['encoder']} at {cfg['size'][0]}x"
              f"{cfg['size'][1]}, batch {cfg['batch']}, {cfg['steps']} steps; this checks the "
              f"code path only, the figures are not GPU figures (autocast and channels_last "
              f"are off on CPU, as in train_model)")
    mixed = train_model.MIXED_PRECISION and cuda
    channels_last = train_model.CHANNELS_LAST and cuda

    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        pairs, _ = write_set(tmp, [cfg["source"]] * cfg["images"], seed=3)
        cache = preprocess.PreprocessCache(load_dataset.work_dir(tmp) / ".cache", cfg["size"], 5)
        t0 = time.perf_counter()
        errors = cache.build(pairs, progress=False)
        build = time.perf_counter() - t0
        if errors:
            raise SystemExit(f"cache build failed: {errors[:3]}")

        loader = make_train_loader(pairs, tmp, cfg["size"], cfg["batch"], True, args.workers,
                                   device)
        timed_pass(loader)  # start the persistent workers
        images, seconds = 0, 0.0
        while seconds < cfg["loader_seconds"]:
            n, t = timed_pass(loader)
            images, seconds = images + n, seconds + t
        loader_ips = images / seconds

        # batches of the real loader, moved to the device once: the model alone
        on_device = [(x.to(device), y.to(device), ids) for x, y, ids in
                     (b for _, b in zip(range(4), loader) if b is not None)]
        fp32_ips, fp32_mem, state = training_rate(cfg["encoder"], on_device, cfg["steps"],
                                                  cfg["warmup"], device, False, False)
        del state  # free the float32 model before the next one's peak memory is taken
        if cuda:
            torch.cuda.empty_cache()
        amp_ips, amp_mem, state = training_rate(cfg["encoder"], on_device, cfg["steps"],
                                                cfg["warmup"], device, mixed, channels_last)
        # the full pipeline: the same (mixed, channels_last) model fed by the cached loader
        model, optimizer, loss_fn, scaler = state
        steps = min(cfg["steps"], len(loader))
        n, t = train_steps(model, optimizer, loss_fn, iter(loader), steps, device, mixed,
                           channels_last, scaler)
        pipe_ips = n / t
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    h, w = cfg["size"]
    amp_name = "mixed precision + channels_last" if cuda else "train_model's GPU flags (off on CPU)"
    rows = [
        (f"training {cfg['encoder']} FPN {h}x{w}, batch {cfg['batch']}, float32", fp32_ips,
         f"peak {fp32_mem:.0f} MB" if cuda else ""),
        (f"training, {amp_name}", amp_ips, f"peak {amp_mem:.0f} MB" if cuda else ""),
        (f"loader from the cache, {args.workers} workers"
         f"{' (train_model.WORKERS)' if args.workers == train_model.WORKERS else ''}, augment",
         loader_ips, f"cache built at {len(pairs) / build:.0f} images/s"),
        ("full pipeline: cached loader + the mixed/channels_last step", pipe_ips, ""),
    ]
    print(f"{'measure':<74}{'images/s':>10}")
    for label, ips, note in rows:
        print(f"{label:<74}{ips:>10.1f}  {note}")
    ratio = loader_ips / amp_ips
    print(f"{'speed-up of mixed precision + channels_last over float32':<74}"
          f"{amp_ips / fp32_ips:>10.2f}")
    print(f"{'loader / training (mixed): >= 1 means the loader keeps up':<74}{ratio:>10.2f}")
    print(f"{'pipeline share (full pipeline / training alone, mixed)':<74}"
          f"{pipe_ips / amp_ips:>10.3f}")
    print(f"({time.time() - started:.0f} s; {os.cpu_count()} CPU cores)")
    print(json.dumps({
        "device": torch.cuda.get_device_name() if cuda else "cpu-smoke",
        "encoder": cfg["encoder"], "size": list(cfg["size"]), "batch": cfg["batch"],
        "workers": args.workers, "train_fp32_ips": round(fp32_ips, 2),
        "train_amp_cl_ips": round(amp_ips, 2), "loader_ips": round(loader_ips, 1),
        "pipeline_ips": round(pipe_ips, 2), "amp_speedup": round(amp_ips / fp32_ips, 3),
        "loader_over_train": round(ratio, 3), "pipeline_share": round(pipe_ips / amp_ips, 3),
        "peak_mb": {"fp32": round(fp32_mem), "amp": round(amp_mem)},
        "seconds": round(time.time() - started, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
