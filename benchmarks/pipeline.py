"""Does the data pipeline keep up with the model? One run, figures measured side by side.

    python benchmarks/pipeline.py            # about 3.5 minutes on a quiet 2-core CPU
    python benchmarks/pipeline.py --quick    # about 1.2 minutes: fewer images, steps, rounds

On generated JPEGs of ISIC sizes (written to a temporary folder, removed afterwards) it measures:

- loader images/s with no cache (decode and resize every time), the first pass (which builds
  the cache) and from the cache, through train_model.make_loaders with its default workers;
- training images/s of the model alone (batches already in memory) and of the full pipeline
  (cached loader + workers + augmentation + the same train_model.train_one_epoch);
- `test_model.py --image` on a 6000x4000 JPEG, split into read, preprocess, model and write;
- peak memory of one training epoch at 200 and at 2000 images (each in a fresh process).

The last line is one JSON object (cache_speedup, pipeline_share, memory_growth, ...) so the
figures can be tracked from run to run. The machine may be shared: the output says how much
CPU other processes took during the run, and speed ratios come from alternating rounds.
"""
import argparse
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import load_dataset  # noqa: E402
import preprocess  # noqa: E402
import train_model  # noqa: E402

# One cycle of 20 source images, an ISIC-2018-like spread: mostly 1024x768 to 3008x2000 with
# some very large camera images (ISIC 2018 Task 1 ranges from about 600 px to over 6000 px wide).
SIZE_CYCLE = [(1024, 768)] * 8 + [(2048, 1536)] * 4 + [(3008, 2000)] * 5 + [(4288, 2848)] \
    + [(6000, 4000)] * 2
SMALL_SOURCE = (640, 480)  # sources of the 200/2000-image memory sets (cache entries are resized)
JPEG_QUALITY = 90
NOISE = 32  # pixel noise amplitude: about 0.3 bytes per pixel at quality 90, like camera JPEGs


# ----------------------------------------------------------------------------- generated data

def _write_pair(task):
    """Write one textured JPEG and its 0/255 PNG mask; (w, h, image, mask, seed)."""
    w, h, image_path, mask_path, seed = task
    rng = np.random.default_rng(seed)
    field = rng.integers(70, 200, (h // 48 + 2, w // 48 + 2, 3), dtype=np.uint8)
    image = cv2.resize(field, (w, h), interpolation=cv2.INTER_CUBIC)
    image = cv2.add(image, rng.integers(0, NOISE, (h, w, 3), dtype=np.uint8))
    centre = (int(w * rng.uniform(0.35, 0.65)), int(h * rng.uniform(0.35, 0.65)))
    axes = (int(w * rng.uniform(0.1, 0.3)), int(h * rng.uniform(0.1, 0.3)))
    angle = float(rng.uniform(0, 180))
    cv2.ellipse(image, centre, axes, angle, 0, 360, (40, 50, 90), -1)  # BGR dark brown
    mask = cv2.ellipse(np.zeros((h, w), np.uint8), centre, axes, angle, 0, 360, 255, -1)
    if not (cv2.imwrite(str(image_path), image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            and cv2.imwrite(str(mask_path), mask)):
        raise OSError(f"cannot write {image_path}")
    return image_path.stat().st_size


def write_set(root, sizes, seed):
    """Pairs of generated images (ISIC 2018 names) of the given sizes under root."""
    from multiprocessing import get_context

    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    pairs, tasks = [], []
    for i, (w, h) in enumerate(sizes):
        pair_id = f"ISIC_{i:07d}"
        pair = load_dataset.Pair(pair_id, images / f"{pair_id}.jpg",
                                 masks / f"{pair_id}_segmentation.png")
        pairs.append(pair)
        tasks.append((w, h, pair.image, pair.mask, [seed, i]))
    with get_context("fork").Pool(os.cpu_count() or 1) as pool:
        total_bytes = sum(pool.imap(_write_pair, tasks, chunksize=8))
    return pairs, total_bytes


def loader_args(root, size, batch, cache, workers):
    """The subset of train_model's arguments that make_loaders reads."""
    return argparse.Namespace(data=str(root), image_size=tuple(size), encoder_depth=5,
                              batch_size=batch, workers=workers, seed=train_model.SEED,
                              cache=cache)


def make_train_loader(pairs, root, size, batch, cache, workers, device=torch.device("cpu")):
    """The training loader exactly as train_model.main builds it (augmentation included)."""
    splits = {"train": pairs, "valid": pairs[:batch]}
    args = loader_args(root, size, batch, cache, workers)
    return train_model.make_loaders(splits, args, device)[0]


def timed_pass(loader):
    """(images, seconds) of one full pass over a loader."""
    t0, images = time.perf_counter(), 0
    for batch in loader:
        if batch is not None:
            images += batch[0].shape[0]
    return images, time.perf_counter() - t0


# ----------------------------------------------------------------------------- measures

def measure_loader(pairs, root, size, batch, workers, min_seconds):
    """Images/s uncached, first (cache-building) pass, and cached; each through make_loaders."""
    out = {}
    uncached = make_train_loader(pairs, root, size, batch, cache=False, workers=workers)
    n, t = timed_pass(uncached)  # worker start-up counted: < 1% of a decode-bound pass
    out["uncached"] = (n / t, t)
    del uncached

    cached = make_train_loader(pairs, root, size, batch, cache=True, workers=workers)
    n, t = timed_pass(cached)  # empty cache: the workers decode, resize and write entries
    out["first"] = (n / t, t)
    timed_pass(cached)  # warm-up: persistent workers started, entries in the page cache
    images, seconds, passes = 0, 0.0, 0
    while seconds < min_seconds or passes < 3:
        n, t = timed_pass(cached)
        images, seconds, passes = images + n, seconds + t, passes + 1
    out["cached"] = (images / seconds, seconds)
    del cached
    return out


def new_training(encoder, seed=0):
    import segmentation_models_pytorch as smp

    torch.manual_seed(seed)
    model = train_model.build_model(encoder, None, 5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    return model, optimizer, smp.losses.DiceLoss("binary", from_logits=True)


def train_steps(model, optimizer, loss_fn, batches, steps, device=torch.device("cpu"),
                mixed=False, channels_last=False, scaler=None):
    """(images, seconds) of `steps` training steps through train_model.train_one_epoch."""
    counted = []

    def feed():
        for batch in itertools.islice(batches, steps):
            counted.append(batch[0].shape[0] if batch is not None else 0)
            yield batch

    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    train_model.train_one_epoch(model, feed(), loss_fn, optimizer, device, 1, [], scaler=scaler,
                                mixed=mixed, channels_last=channels_last, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return sum(counted), time.perf_counter() - t0


def measure_training(pairs, root, size, batch, workers, encoder, steps, rounds, budget):
    """Per round: images/s of the model alone (batches in memory) and of the full pipeline.

    The two run back to back in each round, in the order AB then BA. Other processes on a
    shared machine only ever slow a round down (and a burst of them slows two torch threads
    several-fold), so each side's best round is the closest to its undisturbed speed. Each
    pipeline round starts a fresh epoch (workers start with nothing prefetched), as pessimistic
    as an epoch boundary every `steps` steps. Rounds stop early (after at least two) once
    `budget` seconds are spent: contention can slow two torch threads twenty-fold."""
    loader = make_train_loader(pairs, root, size, batch, cache=True, workers=workers)
    if len(loader) < steps:
        raise SystemExit(f"{len(pairs)} pairs give {len(loader)} batches; need {steps}")
    in_memory = list(itertools.islice(iter(loader), steps))  # same augmented tensors, same size
    model, optimizer, loss_fn = new_training(encoder)
    train_steps(model, optimizer, loss_fn, iter(in_memory), 2)  # warm-up: allocator, Adam state
    timed_pass(loader)  # warm-up: workers started, cache entries read once
    alone, pipeline = [], []
    started = time.perf_counter()
    for r in range(rounds):
        if r >= 2 and time.perf_counter() - started > budget:
            break
        for source in (("alone", "pipeline") if r % 2 == 0 else ("pipeline", "alone")):
            batches = iter(in_memory) if source == "alone" else iter(loader)
            n, t = train_steps(model, optimizer, loss_fn, batches, steps)
            (alone if source == "alone" else pipeline).append(n / t)
    return alone, pipeline


def measure_image(path, mask_path, encoder, size, repeats):
    """Seconds per stage of test_model.py --image on one image (median of `repeats`).

    The model is untrained (no weights here), and its near-0.5 output would binarise to
    speckle that PNG and the overlay's contour handle far more slowly than a lesion. The write
    and overlay stages therefore get the map a trained model gives: the true mask at network
    size, blurred. The model stage still runs the real forward pass on the real input."""
    import test_model

    model = train_model.build_model(encoder, None, 5).eval()
    device = torch.device("cpu")
    ckpt = {"image_size": list(size)}
    truth = preprocess.read_mask(mask_path).astype(np.float32)
    trained_like = cv2.GaussianBlur(cv2.resize(truth, size[::-1], interpolation=cv2.INTER_AREA),
                                    (0, 0), 2)
    out = Path(tempfile.mkdtemp(prefix="image-bench-"))
    stages = {k: [] for k in ("read", "preprocess", "model", "write", "overlay", "predict")}
    try:
        test_model.predict_batch(model, torch.zeros(1, 3, *size), device)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            info = preprocess.image_info(path)
            image = preprocess.read_image(path, min_hw=tuple(size))
            t1 = time.perf_counter()
            small, _ = preprocess.resize_pair(image, None, tuple(size))
            tensor = preprocess.to_tensor(small)[None]
            t2 = time.perf_counter()
            test_model.predict_batch(model, tensor, device)
            t3 = time.perf_counter()
            prob = preprocess.prob_to_original(trained_like, (info["height"], info["width"]))
            pred = test_model.binarise(prob, 0.5)
            test_model.write_mask(pred, out / "mask_segmentation.png")
            t4 = time.perf_counter()
            test_model.save_overlay(Path(path), prob, pred, None, out / "overlay.png", "bench")
            t5 = time.perf_counter()
            # test_model.predict itself (read .. model, then the upsampling): a check on the split
            test_model.predict(model, ckpt, Path(path), device)
            t6 = time.perf_counter()
            for key, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
                stages[key].append(seconds)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {k: statistics.median(v) for k, v in stages.items()}


# ----------------------------------------------------------------------------- memory

def _children(pid):
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    kids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def _kb(pid, name, file):
    try:
        with open(f"/proc/{pid}/{file}") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemory(threading.Thread):
    """Samples the summed PSS of this process and its children (the loader workers).

    PSS splits pages shared after fork between the processes, so the sum is the memory the
    whole tree holds. A sample misses the peak of the swings inside each training step, so it
    is a cross-check; the headline is the sum of each process's exact peak RSS (VmHWM), an
    upper bound that counts pages shared after fork once per process."""

    def __init__(self, interval=0.05):
        super().__init__(daemon=True)
        self.interval, self.peak_pss, self.stop = interval, 0, threading.Event()
        self.workers = set()

    def run(self):
        me = os.getpid()
        while not self.stop.is_set():
            kids = _children(me)
            self.workers.update(kids)
            total = sum(_kb(p, "Pss", "smaps_rollup") for p in [me] + kids)
            self.peak_pss = max(self.peak_pss, total)
            self.stop.wait(self.interval)


def memory_child(args):
    """One epoch from the cache over the first `count` pairs; prints its peak memory as JSON."""
    pairs = all_pairs(Path(args.memory_child))[:args.count]
    loader = make_train_loader(pairs, Path(args.memory_child), args.size, args.batch, True,
                               args.workers)
    model, optimizer, loss_fn = new_training(args.encoder)
    sampler = TreeMemory()
    sampler.start()
    steps = len(loader) if args.memory_steps <= 0 else min(args.memory_steps, len(loader))
    iterator = iter(loader)
    trained, seconds = train_steps(model, optimizer, loss_fn, iterator, steps)
    drained = sum(b[0].shape[0] for b in iterator if b is not None)  # the rest of the epoch
    worker_hwm = [_kb(p, "VmHWM", "status") for p in _children(os.getpid())]
    sampler.stop.set()
    sampler.join()
    main_hwm = _kb(os.getpid(), "VmHWM", "status")
    print(json.dumps({"count": len(pairs), "steps": steps, "batches": len(loader),
                      "images_trained": trained, "images_loaded": trained + drained,
                      "main_peak_rss_mb": main_hwm / 1024,
                      "worker_peak_rss_mb": [round(k / 1024, 1) for k in worker_hwm],
                      "peak_rss_sum_mb": (main_hwm + sum(worker_hwm)) / 1024,
                      "tree_peak_pss_mb": sampler.peak_pss / 1024}))


def all_pairs(root):
    images = sorted((root / "images").glob("*.jpg"))
    return [load_dataset.Pair(p.stem, p, root / "masks" / f"{p.stem}_segmentation.png")
            for p in images]


def measure_memory(root, count, args):
    cmd = [sys.executable, __file__, "--memory-child", str(root), "--count", str(count),
           "--size", *map(str, args.size), "--batch", str(args.batch), "--workers",
           str(args.workers), "--encoder", args.encoder, "--memory-steps", str(args.memory_steps)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"memory run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer images, steps and rounds")
    p.add_argument("--encoder", default="resnet18", help="encoder of the training measures")
    p.add_argument("--size", type=int, nargs=2, default=(160, 160), metavar=("H", "W"),
                   help="training size (CPU-sized; the GPU check uses 320x320)")
    p.add_argument("--loader-size", type=int, nargs=2, default=train_model.IMAGE_SIZE,
                   metavar=("H", "W"), help="working size of the loader measures")
    p.add_argument("--batch", type=int, default=train_model.BATCH_SIZE)
    p.add_argument("--workers", type=int, default=train_model.WORKERS,
                   help="loader workers (train_model.WORKERS)")
    p.add_argument("--image-encoder", default=train_model.ENCODER,
                   help="encoder of the --image measure (one forward pass)")
    p.add_argument("--mix-images", type=int, default=None,
                   help="ISIC-size images for the loader measures (default 40, quick 20)")
    p.add_argument("--steps", type=int, default=None, help="training steps per round")
    p.add_argument("--rounds", type=int, default=None, help="alternating training rounds")
    p.add_argument("--memory-steps", type=int, default=None,
                   help="model steps in each memory epoch, the same at both sizes (default 25, "
                        "quick 10; 0: every batch); the loader always runs the whole epoch")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    args.mix_images = args.mix_images or (20 if quick else 40)
    args.steps = args.steps or (4 if quick else 6)
    args.rounds = args.rounds or (5 if quick else 8)
    if args.memory_steps is None:  # the same model work at both sizes: one 200-image epoch
        args.memory_steps = 10 if quick else 25
    args.size, args.loader_size = tuple(args.size), tuple(args.loader_size)
    return args


def _busy_seconds():
    """CPU seconds all processes on the machine have used since boot (from /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds():
    import resource

    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


_MAIN_PID = os.getpid()


def _on_sigterm(*_):
    """Killed: unwind so the temporary folder is removed. Forked pool and loader processes
    inherit the handler and must simply end (Pool.terminate sends them SIGTERM)."""
    if os.getpid() == _MAIN_PID:
        sys.exit("terminated")
    os._exit(143)


def main(argv=None):
    args = parse_args(argv)
    if args.memory_child:
        return memory_child(args)
    signal.signal(signal.SIGTERM, _on_sigterm)
    started, load_start, busy_start = time.time(), os.getloadavg()[0], _busy_seconds()
    cores = os.cpu_count()
    tmp = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
    try:
        sizes = [SIZE_CYCLE[i % len(SIZE_CYCLE)] for i in range(args.mix_images)]
        print(f"writing {len(sizes)} ISIC-size JPEGs and 2000 small ones to {tmp} ...",
              file=sys.stderr)
        mix_pairs, mix_bytes = write_set(tmp / "mix", sizes, seed=1)
        small_pairs, _ = write_set(tmp / "small", [SMALL_SOURCE] * 2000, seed=2)
        print("loader ...", file=sys.stderr)
        loader = measure_loader(mix_pairs, tmp / "mix", args.loader_size, args.batch,
                                args.workers, min_seconds=2.0 if args.quick else 4.0)
        print(f"  {loader}", file=sys.stderr)
        print("building the cache of the 2000 small pairs ...", file=sys.stderr)
        cache = preprocess.PreprocessCache(load_dataset.work_dir(tmp / "small") / ".cache",
                                           args.size, 5)
        t0 = time.perf_counter()
        errors = cache.build(small_pairs, progress=False)
        build_seconds = time.perf_counter() - t0
        if errors:
            raise SystemExit(f"cache build failed: {errors[:3]}")
        print("training ...", file=sys.stderr)
        alone, pipeline = measure_training(small_pairs[:200], tmp / "small", args.size,
                                           args.batch, args.workers, args.encoder, args.steps,
                                           args.rounds, budget=45 if args.quick else 120)
        print(f"  model alone {alone}, pipeline {pipeline}", file=sys.stderr)
        print("--image ...", file=sys.stderr)
        largest = max(mix_pairs, key=lambda p: p.image.stat().st_size)
        largest_mb = largest.image.stat().st_size / 1e6
        largest_hw = preprocess.image_info(largest.image)
        image = measure_image(largest.image, largest.mask, args.image_encoder, args.loader_size,
                              repeats=2 if args.quick else 3)
        print(f"  {image}", file=sys.stderr)
        print("memory ...", file=sys.stderr)
        memory = {n: measure_memory(tmp / "small", n, args) for n in (200, 2000)}
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    wall = time.time() - started
    others = None if busy_start is None else \
        max(0.0, (_busy_seconds() - busy_start - _own_seconds()) / wall)  # cores used by others
    cache_speedup = loader["cached"][0] / loader["uncached"][0]
    model_ips, pipe_ips = max(alone), max(pipeline)  # best rounds: see measure_training
    pipeline_share = pipe_ips / model_ips
    median_share = statistics.median(b / a for a, b in zip(alone, pipeline))
    mem_small, mem_large = memory[200]["peak_rss_sum_mb"], memory[2000]["peak_rss_sum_mb"]
    memory_growth = mem_large / mem_small
    main_growth = memory[2000]["main_peak_rss_mb"] / memory[200]["main_peak_rss_mb"]
    pss_growth = memory[2000]["tree_peak_pss_mb"] / memory[200]["tree_peak_pss_mb"]
    io_total = image["read"] + image["preprocess"] + image["model"] + image["write"]

    mix = ", ".join(f"{w}x{h} {sizes.count((w, h)) / len(sizes):.0%}"
                    for w, h in sorted(set(sizes)))
    ly, lx = args.loader_size
    ty, tx = args.size
    mem_steps = "every batch" if args.memory_steps <= 0 else f"the first {args.memory_steps} " \
                                                            f"batches"
    lines = [
        f"pipeline benchmark{' (--quick)' if args.quick else ''}: {cores} CPU cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"loader workers {args.workers}"
        f"{' (train_model.WORKERS)' if args.workers == train_model.WORKERS else ''}, "
        f"batch {args.batch}",
        f"sources: {len(sizes)} generated JPEGs (q{JPEG_QUALITY}, {mix_bytes / 1e6:.0f} MB, "
        f"{mix_bytes / sum(w * h for w, h in sizes):.2f} B/px) + PNG 0/255 masks; sizes: {mix}",
        f"load average {load_start:.1f} at start; other processes used "
        + ("?" if others is None else f"{others:.2f}") + f" of the {cores} cores on average "
        f"during the run" + ("  ** shared machine: timings are noisy **"
                             if others is not None and others > 0.2 else ""),
        "",
        f"{'measure':<58}{'images/s':>10}{'seconds':>10}",
        f"{f'loader {ly}x{lx}, no cache (decode + resize every time)':<58}"
        f"{loader['uncached'][0]:>10.1f}{loader['uncached'][1]:>10.2f}",
        f"{f'loader {ly}x{lx}, first pass (builds the cache)':<58}"
        f"{loader['first'][0]:>10.1f}{loader['first'][1]:>10.2f}",
        f"{f'loader {ly}x{lx}, from the cache':<58}"
        f"{loader['cached'][0]:>10.1f}{loader['cached'][1]:>10.2f}",
        f"{'  cache_speedup (cached / no cache)':<58}{cache_speedup:>10.1f}",
        f"{'cache build, 2000 pairs 640x480, PreprocessCache.build':<58}"
        f"{2000 / build_seconds:>10.1f}{build_seconds:>10.2f}",
        f"{f'training {args.encoder} FPN {ty}x{tx}, model alone (batches in RAM)':<58}"
        f"{model_ips:>10.2f}{'':>10}   rounds: {' '.join(f'{x:.1f}' for x in alone)}",
        f"{f'training, full pipeline (cached loader+workers+augment)':<58}"
        f"{pipe_ips:>10.2f}{'':>10}   rounds: {' '.join(f'{x:.1f}' for x in pipeline)}",
        f"{'  pipeline_share (best round over best round)':<58}{pipeline_share:>10.3f}"
        f"   median of per-round ratios: {median_share:.3f}",
        "",
        f"test_model --image, {largest_mb:.1f} MB {largest_hw['width']}x{largest_hw['height']} "
        f"JPEG, {args.image_encoder} FPN at {ly}x{lx}, CPU (median of "
        f"{2 if args.quick else 3}):",
        "  " + ", ".join(f"{k} {image[k]:.3f} s" for k in ("read", "preprocess", "model", "write"))
        + f"; model share {image['model'] / io_total:.0%} of {io_total:.2f} s",
        f"  (write = upsample to full size + threshold + PNG; the map written is a trained-like "
        f"blurred lesion, not the untrained model's speckle)",
        f"  + overlay figure {image['overlay']:.3f} s; check: test_model.predict (read to "
        f"upsample) {image['predict']:.3f} s",
        "",
        f"peak memory, one epoch from the cache ({ty}x{tx}, all batches loaded, model step on "
        f"{mem_steps}):",
    ]
    for n in (200, 2000):
        m = memory[n]
        lines.append(f"  {n:>5} images: peak RSS main {m['main_peak_rss_mb']:.0f} + workers "
                     f"{' + '.join(f'{x:.0f}' for x in m['worker_peak_rss_mb'])} = "
                     f"{m['peak_rss_sum_mb']:.0f} MB; sampled PSS of all "
                     f"{m['tree_peak_pss_mb']:.0f} MB ({m['images_loaded']} images loaded, "
                     f"{m['images_trained']} trained)")
    lines.append(f"{'  memory_growth (2000 / 200, summed peak RSS)':<58}{memory_growth:>10.3f}"
                 f"   main alone {main_growth:.3f}, sampled PSS {pss_growth:.3f}")
    lines.append(f"targets: cache_speedup >= 10: {'ok' if cache_speedup >= 10 else 'MISSED'}; "
                 f"pipeline_share >= 0.90: {'ok' if pipeline_share >= 0.90 else 'MISSED'}; "
                 f"memory_growth <= 1.10: {'ok' if memory_growth <= 1.10 else 'MISSED'}"
                 f"  ({time.time() - started:.0f} s)")
    if others is not None and others > 0.5:
        lines.append(f"** other processes held {others:.2f} of {cores} cores: the speed figures "
                     f"of this run are not trustworthy; rerun on a quiet machine **")
    print("\n".join(lines))
    print(json.dumps({
        "cache_speedup": round(cache_speedup, 2), "pipeline_share": round(pipeline_share, 3),
        "memory_growth": round(memory_growth, 3), "memory_growth_main_rss": round(main_growth, 3),
        "memory_growth_pss": round(pss_growth, 3),
        "loader_uncached_ips": round(loader["uncached"][0], 2),
        "loader_first_pass_ips": round(loader["first"][0], 2),
        "loader_cached_ips": round(loader["cached"][0], 1),
        "model_alone_ips": round(model_ips, 3), "pipeline_ips": round(pipe_ips, 3),
        "pipeline_share_median_round": round(median_share, 3),
        "image_seconds": {k: round(v, 4) for k, v in image.items()},
        "peak_rss_sum_mb": {str(n): round(memory[n]["peak_rss_sum_mb"], 1) for n in memory},
        "quick": args.quick, "cores": cores, "workers": args.workers, "encoder": args.encoder,
        "train_size": list(args.size), "loader_size": list(args.loader_size),
        "batch": args.batch, "load_avg_start": round(load_start, 2),
        "other_cores": None if others is None else round(others, 2),
        "seconds": round(time.time() - started, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
