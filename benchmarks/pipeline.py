"""Does the data pipeline keep up with the model? One run, figures measured side by side.

    python benchmarks/pipeline.py            # about 4 minutes on a quiet 2-core CPU
    python benchmarks/pipeline.py --quick    # about 1.5 minutes: fewer images, steps, rounds

On generated JPEGs of ISIC sizes (written to a temporary folder, removed afterwards) it measures:

- loader images/s with no cache (decode and resize every time), the first pass (which builds
  the cache) and from the cache, through load_dataset.make_loader as training builds it;
- training images/s of the model alone (batches already in memory) and of the full pipeline
  (cached loader + workers + augmentation + the same training step);
- validation images/s at network size (forward + loss + batch_confusion, as validation ran
  before) and at each image's original size (engine.validate's loop), and their ratio;
- `test_model.py --image` on a 6000x4000 JPEG, split into read, preprocess, model and write
  (timed through the modules that script calls: preprocess, predict.predict_batch, and the
  mask written as evaluate.write_mask writes it, preprocess.atomic_write + PIL), and the
  whole script once, end to end, as a subprocess (start-up, checkpoint, mask and overlay);
- peak memory of one training epoch at 200 and at 2000 images (each in a fresh process).
- precision: engine's training step and predict.probabilities in float32, bf16 and each
  with channels_last, for resnet18 at 128x128 and se_resnext50_32x4d at 320x320: images/s,
  FLOPs per image (FlopCounterMode), GFLOP/s and its share of a 2048x2048 matmul in the same
  precision measured in the same run, and the bf16/float32 ratios (--precision-only: this
  part alone; one thread, --quick --precision-rounds 3, it took under 8 minutes).

The training step and validation timed are the project's own (engine.train_one_epoch and
engine.validate, called in one place below, train_steps and validation_pass); what is measured
by default is train_model.py's default run, declared in one block of constants below. The
last line is one JSON object (cache_speedup, pipeline_share, valid_original_over_network,
memory_growth, precision, ...) so the figures can be tracked from run to run (docs/speed.md
shows a run). The machine may be shared: the output says how much CPU other processes took
during the run, and speed ratios come from alternating rounds.
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
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import checkpoint  # noqa: E402
import device as device_lib  # noqa: E402
import engine  # noqa: E402  (the training step and validation timed here are its own)
import load_dataset  # noqa: E402
import metrics  # noqa: E402
import model as model_lib  # noqa: E402
import predict  # noqa: E402
import preprocess  # noqa: E402
import settings  # noqa: E402

# ----------------------------------------------------------------------------- defaults
# train_model.py's default run: what the benchmarks measure unless a flag says otherwise,
# read from the one place it is set (`python train_model.py --print-settings`): TRAIN.ARCH,
# TRAIN.ENCODER, TRAIN.IMAGE_SIZE, ... are train_model.py's constants
TRAIN = SimpleNamespace(**settings.defaults(settings.read_script(REPO / "train_model.py")))

# this benchmark's own CPU-sized training measure (the GPU check uses IMAGE_SIZE)
TRAIN_ENCODER = "resnet18"
TRAIN_SIZE = (160, 160)            # (height, width)
# ---------------------------------------------------------------------------------------

CPU = torch.device("cpu")

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




# ----------------------------------------------------------------------------- loaders

@dataclass(frozen=True)
class ImageSet:
    """Generated pairs on disk and how a measure's loader reads them."""
    pairs: list
    root: Path
    size: tuple  # network size (height, width)
    batch: int = TRAIN.BATCH_SIZE
    workers: int = TRAIN.WORKERS

    def subset(self, count):
        return replace(self, pairs=self.pairs[:count])


def train_cache(root, size):
    """The preprocessed cache of a data folder, where train_model.py puts it."""
    return preprocess.PreprocessCache(load_dataset.cache_dir_for(root), tuple(size))


def make_train_loader(pairs, root, size, batch, cache, workers, device=CPU):
    """The training loader as train_model.py builds it (augmentation included)."""
    options = load_dataset.LoaderOptions(workers=workers, cache=train_cache(root, size)
                                         if cache else None, seed=TRAIN.SEED,
                                         pin_memory=device.type == "cuda")
    return load_dataset.make_loader(pairs, input_settings(size), batch, options, train=True)


def input_settings(size):
    """preprocess.InputSettings of a training run at `size` with train_model.py's MEAN, STD."""
    return preprocess.InputSettings(tuple(size), preprocess.INTERPOLATION, TRAIN.MEAN, TRAIN.STD)


def data_loader(data, cache=True, device=CPU):
    """make_train_loader of an ImageSet."""
    return make_train_loader(data.pairs, data.root, data.size, data.batch, cache, data.workers,
                             device)


def next_epoch(loader):
    """An iterator over the loader's next epoch: set_epoch first, as training does."""
    loader.sampler.set_epoch(loader.sampler.epoch + 1)
    return iter(loader)


def timed_pass(loader):
    """(images, seconds) of one full pass (a new epoch) over a loader."""
    t0, images = time.perf_counter(), 0
    for batch in next_epoch(loader):
        if batch is not None:
            images += batch[0].shape[0]
    return images, time.perf_counter() - t0


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- training step

@dataclass(frozen=True)
class Precision:
    """Where and in what the model computes, as engine.Trainer takes it: autocast on or off
    and the memory format as they run (device.Compute turns the settings into these; the
    precision measure also sets them directly, e.g. channels_last in float32 on a CPU)."""
    device: torch.device = CPU
    mixed: bool = False
    channels_last: bool = False

    @classmethod
    def of(cls, compute):
        """The Precision of a device.Compute (settings as train_model.py applies them)."""
        return cls(compute.device, compute.mixed, compute.channels_last)


def default_precision(device=CPU):
    """Precision of train_model.py's MIXED_PRECISION and CHANNELS_LAST on `device`."""
    return Precision.of(device_lib.Compute(device, TRAIN.MIXED_PRECISION, TRAIN.CHANNELS_LAST))


def new_training(encoder, seed=0, device=CPU):
    """(model, optimiser, the training loss) built as train_model.py builds them (ARCH,
    ENCODER_DEPTH, LR, LOSS; engine.make_optimizer), no pretrained weights; the model is moved
    to `device` by the caller."""
    torch.manual_seed(seed)
    model = model_lib.build_model(encoder, None, TRAIN.ENCODER_DEPTH, TRAIN.ARCH)
    return model, engine.make_optimizer(model, TRAIN.LR, device), model_lib.make_loss(TRAIN.LOSS)


def new_default_training(encoder):
    """new_training on the CPU, in the memory format training uses there."""
    model, optimizer, loss_fn = new_training(encoder)
    if default_precision().channels_last:
        model.to(memory_format=torch.channels_last)
    return model, optimizer, loss_fn


# The project's own loops, called here and nowhere else in the benchmarks (gpu_check.py
# imports these two), through the engine module, so a change of their signatures is met in
# one place and a test can replace them there.

def train_steps(model, optimizer, loss_fn, batches, steps, precision=Precision(), scaler=None):
    """(images, seconds) of engine.train_one_epoch over the next `steps` batches (None
    batches count as steps and train nothing), the step a training run takes."""
    trainer = engine.Trainer(model, loss_fn, precision.device, optimizer, scaler,
                             precision.mixed, precision.channels_last, TRAIN.THRESHOLD)
    sync(precision.device)
    t0 = time.perf_counter()
    trained = engine.train_one_epoch(trainer, itertools.islice(batches, steps), 1, [],
                                     progress=False)
    sync(precision.device)
    return trained.images, time.perf_counter() - t0


def validation_pass(model, loader, loss_fn, precision=Precision(), threads=1):
    """(images, seconds) of engine.validate over the loader: the loss at network size,
    each probability map resized to its true mask's size, cut and scored in threads."""
    t0 = time.perf_counter()
    trainer = engine.Trainer(model, loss_fn, precision.device, mixed=precision.mixed,
                             channels_last=precision.channels_last, threshold=TRAIN.THRESHOLD)
    scores = engine.validate(trainer, loader, threads)
    return scores["images"], time.perf_counter() - t0


# ----------------------------------------------------------------------------- measures

def measure_loader(data, min_seconds):
    """Images/s uncached, first (cache-building) pass, and cached; each a training loader."""
    out = {}
    uncached = data_loader(data, cache=False)
    n, t = timed_pass(uncached)  # worker start-up counted: < 1% of a decode-bound pass
    out["uncached"] = (n / t, t)
    del uncached

    cached = data_loader(data)
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


def build_cache(pairs, root, size):
    """Seconds to build the cache of `pairs` with PreprocessCache.build (images and truths)."""
    t0 = time.perf_counter()
    errors = train_cache(root, size).build(pairs, progress=False)
    if errors:
        raise SystemExit(f"cache build failed: {errors[:3]}")
    return time.perf_counter() - t0


@dataclass(frozen=True)
class Rounds:
    """How a speed measure repeats: steps per round, rounds, and the seconds after which it
    stops early (after at least two rounds)."""
    steps: int
    rounds: int
    budget: float = float("inf")


def measure_training(data, encoder, rounds):
    """Per round: images/s of the model alone (batches in memory) and of the full pipeline.

    The two run back to back in each round, in the order AB then BA. Other processes on a
    shared machine only ever slow a round down (and a burst of them slows two torch threads
    several-fold), so each side's best round is the closest to its undisturbed speed. Each
    pipeline round starts a fresh epoch (workers start with nothing prefetched), as pessimistic
    as an epoch boundary every `steps` steps. Rounds stop early (after at least two) once
    `budget` seconds are spent: contention can slow two torch threads twenty-fold."""
    loader = data_loader(data)
    steps = rounds.steps
    if len(loader) < steps:
        raise SystemExit(f"{len(data.pairs)} pairs give {len(loader)} batches; need {steps}")
    # same augmented tensors, same size
    in_memory = list(itertools.islice(next_epoch(loader), steps))
    model, optimizer, loss_fn = new_default_training(encoder)
    amp = default_precision()  # the CPU's default precision, as a training run takes it
    train_steps(model, optimizer, loss_fn, iter(in_memory), 2, amp)  # warm-up
    timed_pass(loader)  # warm-up: workers started, cache entries read once
    alone, pipeline = [], []
    started = time.perf_counter()
    for r in range(rounds.rounds):
        if r >= 2 and time.perf_counter() - started > rounds.budget:
            break
        for source in (("alone", "pipeline") if r % 2 == 0 else ("pipeline", "alone")):
            batches = iter(in_memory) if source == "alone" else next_epoch(loader)
            n, t = train_steps(model, optimizer, loss_fn, batches, steps, amp)
            (alone if source == "alone" else pipeline).append(n / t)
    return alone, pipeline


# ----------------------------------------------------------------------------- validation

@torch.inference_mode()
def network_size_pass(model, loader, loss_fn, precision=Precision()):
    """(images, seconds) of validation at network size, as training validated before: forward,
    loss, metrics.batch_confusion against the network-size masks. Not the project's
    validation (validation_pass is): the reference that prices scoring at original size."""
    device = precision.device
    model.eval()
    counts = []
    sync(device)
    t0 = time.perf_counter()
    for batch in next_epoch(loader):
        if batch is None:
            continue
        masks = batch[1].to(device, non_blocking=True)
        with device_lib.autocast(device, precision.mixed):
            logits = model(device_lib.to_device(batch[0], device,
                                                precision.channels_last)).float()
        loss_fn(logits, masks).item()
        counts += metrics.batch_confusion(torch.sigmoid(logits), masks, TRAIN.THRESHOLD).tolist()
    sync(device)
    return len(counts), time.perf_counter() - t0


def peak_extra_mb(run):
    """(run's result, this process's peak RSS above its RSS at the start, MB, or None)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return run(), None
    before = _kb("self", "VmRSS", "status")
    result = run()
    return result, (_kb("self", "VmHWM", "status") - before) / 1024


def validation_passes(data, encoder, precision):
    """{"network": pass, "original": pass}: the two validations of one model over the same
    cached images, each a function giving (images, seconds)."""
    device = precision.device
    options = load_dataset.LoaderOptions(workers=data.workers,
                                         cache=train_cache(data.root, data.size),
                                         pin_memory=device.type == "cuda")
    common = dict(settings=input_settings(data.size), batch_size=data.batch, options=options)
    network = load_dataset.make_loader(data.pairs, **common)
    original = load_dataset.make_loader(data.pairs, truth=True, **common)
    torch.manual_seed(0)
    model = model_lib.build_model(encoder, None, TRAIN.ENCODER_DEPTH, TRAIN.ARCH).to(device)
    if precision.channels_last:
        model.to(memory_format=torch.channels_last)
    loss_fn = model_lib.make_loss(TRAIN.LOSS)
    return {"network": lambda: network_size_pass(model, network, loss_fn, precision),
            "original": lambda: validation_pass(model, original, loss_fn, precision,
                                                threads=max(1, data.workers))}


def measure_validation(data, encoder, rounds, precision=Precision()):
    """Seconds of a validation pass at network size and at original size, same model, images
    and cache (built before timing), in alternating rounds; the best round of each counts."""
    build_cache(data.pairs, data.root, data.size)  # entries and true masks: nothing decoded
    passes = validation_passes(data, encoder, precision)
    for run in passes.values():
        run()  # warm-up: workers started, entries in the page cache, allocator grown
    seconds, extra_mb = {key: [] for key in passes}, {key: [] for key in passes}
    for r in range(rounds):
        for key in (("network", "original") if r % 2 == 0 else ("original", "network")):
            (n, t), extra = peak_extra_mb(passes[key])
            seconds[key].append(t)
            extra_mb[key].append(extra)
    extra_mb = {key: None if None in v else max(v) for key, v in extra_mb.items()}
    best = {key: min(v) for key, v in seconds.items()}
    return {"images": n, "network_ips": n / best["network"], "original_ips": n / best["original"],
            "network_s": best["network"], "original_s": best["original"],
            "ratio": best["original"] / best["network"],
            "median_ratio": statistics.median(o / w for w, o in zip(seconds["network"],
                                                                    seconds["original"])),
            "rounds": seconds, "peak_extra_mb": extra_mb,
            "pixels": sum(w * h for w, h in (preprocess.stored_hw(p.mask) for p in data.pairs))}


# ----------------------------------------------------------------------------- one image

def untrained_settings(encoder, size):
    """The settings record (checkpoint.make_checkpoint's run["settings"]) of an untrained
    network of train_model.py's default run with `encoder` at `size`."""
    return {"arch": TRAIN.ARCH, "encoder": encoder, "encoder_depth": TRAIN.ENCODER_DEPTH,
            "image_size": list(size), "mean": list(TRAIN.MEAN), "std": list(TRAIN.STD),
            "threshold": TRAIN.THRESHOLD, "interpolation": preprocess.INTERPOLATION,
            "seed": TRAIN.SEED, "lr": TRAIN.LR, "loss": TRAIN.LOSS, "folds": 1, "fold": None,
            "data": "", "demo": False}


def untrained_checkpoint(path, encoder, size):
    """(model, checkpoint dict), the checkpoint also written to `path` (None: not written):
    an untrained network (speed does not depend on the weights)."""
    torch.manual_seed(TRAIN.SEED)
    model = model_lib.build_model(encoder, None, TRAIN.ENCODER_DEPTH, TRAIN.ARCH).eval()
    ckpt = checkpoint.make_checkpoint(model, {"settings": untrained_settings(encoder, size)},
                                      0, None)
    if path is not None:
        checkpoint.save_checkpoint(ckpt, path)
    return model, ckpt


def write_png_mask(pred, path):
    """A bool mask as evaluate.write_mask writes it: 0/255, 8-bit grayscale PNG, fast
    compression, through preprocess.atomic_write."""
    from PIL import Image

    with preprocess.atomic_write(path) as tmp:
        Image.fromarray(np.where(pred, 255, 0).astype(np.uint8)).save(tmp, format="PNG",
                                                                       compress_level=1)


def image_stages(path, model, ckpt, trained_like, out):
    """Seconds of read, preprocess, model, write, and predict.predict (read to upsample) for
    one image, as test_model.py --image runs them on the CPU in its default precision."""
    compute = device_lib.Compute(CPU, TRAIN.MIXED_PRECISION, TRAIN.CHANNELS_LAST)
    settings = checkpoint.input_settings(ckpt)
    t0 = time.perf_counter()
    info = preprocess.image_info(path)
    image = preprocess.read_image(path, min_hw=settings.size_hw)
    t1 = time.perf_counter()
    small, _ = preprocess.resize_pair(image, None, settings.size_hw, settings.interpolation)
    tensor = preprocess.to_tensor(small, settings.mean, settings.std)[None]
    t2 = time.perf_counter()
    predict.predict_batch(model, tensor, compute)
    t3 = time.perf_counter()
    prob = preprocess.prob_to_original(trained_like, (info["height"], info["width"]))
    write_png_mask(preprocess.binarise(prob, TRAIN.THRESHOLD), out / "mask_segmentation.png")
    t4 = time.perf_counter()
    predict.predict(model, ckpt, Path(path), compute)  # a check on the split
    t5 = time.perf_counter()
    times = (t0, t1, t2, t3, t4, t5)
    return {key: end - start for key, start, end in
            zip(("read", "preprocess", "model", "write", "predict"), times, times[1:])}


def script_seconds(path, ckpt_path, out):
    """Wall seconds of `python test_model.py --image PATH` on the CPU, run as a user runs it
    (a subprocess: start-up, imports, checkpoint, prediction, mask, overlay figure)."""
    cmd = [sys.executable, str(REPO / "test_model.py"), "--image", str(path), "--checkpoint",
           str(ckpt_path), "--out", str(out), "--device", "cpu"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"test_model.py --image failed:\n{done.stderr[-3000:]}")
    return seconds


def measure_image(path, mask_path, encoder, size, repeats):
    """Seconds per stage of test_model.py --image on one image (median of `repeats`), and of
    the whole script once.

    The model is untrained (no weights here), and its near-0.5 output would binarise to
    speckle that PNG handles far more slowly than a lesion. The write stage therefore gets the
    map a trained model gives: the true mask at network size, blurred. The model stage still
    runs the real forward pass on the real input. The script run (the overlay figure
    included) writes the untrained model's own mask."""
    out = Path(tempfile.mkdtemp(prefix="image-bench-"))
    model, ckpt = untrained_checkpoint(out / "untrained.pth", encoder, size)
    if default_precision().channels_last:  # as predict.load_model places it
        model.to(memory_format=torch.channels_last)
    truth = preprocess.read_mask(mask_path).astype(np.float32)
    trained_like = cv2.GaussianBlur(cv2.resize(truth, size[::-1], interpolation=cv2.INTER_AREA),
                                    (0, 0), 2)
    try:
        predict.predict_batch(model, torch.zeros(1, 3, *size),  # warm-up
                              device_lib.Compute(CPU, TRAIN.MIXED_PRECISION, TRAIN.CHANNELS_LAST))
        runs = [image_stages(path, model, ckpt, trained_like, out) for _ in range(repeats)]
        stages = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        stages["script"] = script_seconds(path, out / "untrained.pth", out / "script")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return stages


# ----------------------------------------------------------------------------- precision

# (encoder, size): the CPU recipe's model and the paper's; batch BATCH_SIZE, no weights
PRECISION_CASES = (("resnet18", (128, 128)), ("se_resnext50_32x4d", (320, 320)))
# (name, mixed, channels_last): mixed is MIXED_PRECISION, bfloat16 autocast on this CPU
PRECISION_VARIANTS = (("float32", False, False), ("float32 + channels_last", False, True),
                      ("bf16", True, False), ("bf16 + channels_last", True, True))
PEAK_MATMUL = 2048  # side of the square matrix multiply that gives the practical peak


def matmul_gflops(dtype, n=PEAK_MATMUL, min_seconds=0.5):
    """GFLOP/s of an n x n matrix multiply in dtype (best of repeated timings): what this CPU
    reaches on the kind of work it does best, the practical peak for that precision."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # warm-up: oneDNN/BLAS kernels chosen, pages touched
    best, spent = float("inf"), 0.0
    while spent < min_seconds:
        t0 = time.perf_counter()
        torch.mm(a, b)
        t = time.perf_counter() - t0
        best, spent = min(best, t), spent + t
    return 2 * n ** 3 / best / 1e9


def flops_per_image(encoder, size, batch):
    """(training, inference) floating-point operations per image, counted by torch's
    FlopCounterMode (convolutions and matrix products, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    model, _, loss_fn = new_training(encoder)
    images, masks = synthetic_batch(size, batch)
    with FlopCounterMode(display=False) as train_count:
        loss_fn(model.train()(images), masks).backward()
    with FlopCounterMode(display=False) as infer_count, torch.inference_mode():
        model.eval()(images)
    return train_count.get_total_flops() / batch, infer_count.get_total_flops() / batch


def synthetic_batch(size, batch):
    """A batch of images and 0/1 masks of the training format: speed does not depend on the
    pixels, so no files are needed for the precision measure."""
    g = torch.Generator().manual_seed(TRAIN.SEED)
    images = torch.randn(batch, 3, *size, generator=g)
    masks = (torch.rand(batch, 1, *size, generator=g) > 0.7).float()
    return images, masks


def inference_rate(model, images, precision, repeats):
    """Images/s of predict.probabilities, the forward pass test_model.py and the ensembles
    run."""
    t0 = time.perf_counter()
    for _ in range(repeats):
        predict.probabilities(model, images, precision.device, precision.mixed,
                              precision.channels_last)
    sync(precision.device)
    return repeats * images.shape[0] / (time.perf_counter() - t0)


def measure_precision(encoder, size, batch, steps, rounds, device=CPU):
    """Training-step and inference images/s of each precision variant, in rotating rounds
    (each round starts with another variant); the matrix-multiply peaks in float32 and
    bfloat16, measured between the rounds; FLOPs per image. Best round of each."""
    images, masks = synthetic_batch(size, batch)
    batch_list = [(images, masks, None)] * steps
    variants = {}
    for name, mixed, channels_last in PRECISION_VARIANTS:
        precision = Precision(device, mixed and device_lib.autocast_dtype(device, True)
                              is not None, channels_last)
        model, optimizer, loss_fn = new_training(encoder)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        train_steps(model, optimizer, loss_fn, iter(batch_list), 2,
                    precision)  # warm-up: oneDNN primitives, Adam's state
        variants[name] = dict(model=model, optimizer=optimizer, loss_fn=loss_fn,
                              precision=precision, train=[], infer=[])
    peaks = {"float32": [], "bf16": []}
    names = list(variants)
    for r in range(rounds):
        for dtype, key in ((torch.float32, "float32"), (torch.bfloat16, "bf16")):
            peaks[key].append(matmul_gflops(dtype))
        for name in names[r % len(names):] + names[:r % len(names)]:
            v = variants[name]
            n, t = train_steps(v["model"], v["optimizer"], v["loss_fn"], iter(batch_list),
                               steps, v["precision"])
            v["train"].append(n / t)
            v["infer"].append(inference_rate(v["model"], images, v["precision"],
                                             max(2, steps // 2)))
    train_flops, infer_flops = flops_per_image(encoder, size, batch)
    return {"encoder": encoder, "size": list(size), "batch": batch, "steps": steps,
            "train_flops": train_flops, "infer_flops": infer_flops,
            "peak": {k: max(v) for k, v in peaks.items()}, "peak_rounds": peaks,
            "variants": {name: {"mixed": v["precision"].mixed,
                                "channels_last": v["precision"].channels_last,
                                "train": v["train"], "infer": v["infer"]}
                         for name, v in variants.items()}}


def precision_lines(p):
    """The table of one case: images/s, GFLOP/s and share of the practical peak, then ratios."""
    (h, w), peak = p["size"], p["peak"]
    lines = [f"precision: {p['encoder']} FPN {h}x{w}, batch {p['batch']}, "
             f"{torch.get_num_threads()} threads; FLOPs per image (FlopCounterMode): training "
             f"step {p['train_flops'] / 1e9:.2f} G, inference {p['infer_flops'] / 1e9:.2f} G",
             f"  practical peak, {PEAK_MATMUL}x{PEAK_MATMUL} matmul: float32 "
             f"{peak['float32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s "
             f"(bf16/float32 {peak['bf16'] / peak['float32']:.2f})",
             f"  {'variant':<26}{'train im/s':>11}{'GFLOP/s':>9}{'of peak':>9}"
             f"{'infer im/s':>12}{'GFLOP/s':>9}{'of peak':>9}"]
    best = {}
    for name, v in p["variants"].items():
        key = "bf16" if v["mixed"] else "float32"
        train, infer = max(v["train"]), max(v["infer"])
        best[name] = (train, infer)
        tg, ig = train * p["train_flops"] / 1e9, infer * p["infer_flops"] / 1e9
        lines.append(f"  {name:<26}{train:>11.2f}{tg:>9.0f}{tg / peak[key]:>9.0%}"
                     f"{infer:>12.2f}{ig:>9.0f}{ig / peak[key]:>9.0%}")
    f32, f32cl = best["float32"], best["float32 + channels_last"]
    b16, b16cl = best["bf16"], best["bf16 + channels_last"]
    lines += [f"  bf16 / float32: training {b16[0] / f32[0]:.2f}x, with channels_last "
              f"{b16cl[0] / f32[0]:.2f}x; inference {b16[1] / f32[1]:.2f}x, with "
              f"channels_last {b16cl[1] / f32[1]:.2f}x (goal: training >= 1.5x)",
              f"  channels_last / contiguous: float32 training {f32cl[0] / f32[0]:.2f}x, "
              f"inference {f32cl[1] / f32[1]:.2f}x; bf16 training {b16cl[0] / b16[0]:.2f}x, "
              f"inference {b16cl[1] / b16[1]:.2f}x",
              f"  (best of {len(p['variants']['float32']['train'])} rotating rounds of "
              f"{p['steps']} engine.train_one_epoch steps and predict.probabilities passes; "
              f"goal: the step at >= 50% of its precision's peak)"]
    return lines


def precision_json(p):
    out = {"train_flops_g": round(p["train_flops"] / 1e9, 3),
           "infer_flops_g": round(p["infer_flops"] / 1e9, 3),
           "peak_gflops": {k: round(v, 1) for k, v in p["peak"].items()}}
    for name, v in p["variants"].items():
        key = "bf16" if v["mixed"] else "float32"
        out[name] = {"train_ips": round(max(v["train"]), 3),
                     "infer_ips": round(max(v["infer"]), 3),
                     "train_share_of_peak": round(max(v["train"]) * p["train_flops"] / 1e9
                                                  / p["peak"][key], 3)}
    return out


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
    model, optimizer, loss_fn = new_default_training(args.encoder)
    sampler = TreeMemory()
    sampler.start()
    steps = len(loader) if args.memory_steps <= 0 else min(args.memory_steps, len(loader))
    iterator = next_epoch(loader)
    trained, seconds = train_steps(model, optimizer, loss_fn, iterator, steps,
                                   default_precision())
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
    p.add_argument("--encoder", default=TRAIN_ENCODER,
                   help="encoder of the training and validation measures")
    p.add_argument("--size", type=int, nargs=2, default=TRAIN_SIZE, metavar=("H", "W"),
                   help="training size (CPU-sized; the GPU check uses IMAGE_SIZE)")
    p.add_argument("--loader-size", type=int, nargs=2, default=TRAIN.IMAGE_SIZE, metavar=("H", "W"),
                   help="working size of the loader and validation measures")
    p.add_argument("--batch", type=int, default=TRAIN.BATCH_SIZE)
    p.add_argument("--workers", type=int, default=TRAIN.WORKERS,
                   help="loader workers (WORKERS: train_model.py's default)")
    p.add_argument("--image-encoder", default=TRAIN.ENCODER,
                   help="encoder of the --image measure (one forward pass)")
    p.add_argument("--mix-images", type=int, default=None,
                   help="ISIC-size images for the loader measures (default 40, quick 20)")
    p.add_argument("--steps", type=int, default=None, help="training steps per round")
    p.add_argument("--rounds", type=int, default=None, help="alternating training rounds")
    p.add_argument("--valid-rounds", type=int, default=None,
                   help="alternating validation rounds (default 4, quick 2)")
    p.add_argument("--memory-steps", type=int, default=None,
                   help="model steps in each memory epoch, the same at both sizes (default 25, "
                        "quick 10; 0: every batch); the loader always runs the whole epoch")
    p.add_argument("--precision-only", action="store_true",
                   help="only the precision measure (float32 / bf16, channels_last)")
    p.add_argument("--skip-precision", action="store_true", help="leave the precision measure out")
    p.add_argument("--precision-rounds", type=int, default=None,
                   help="rotating rounds of the precision measure (default 4, quick 2)")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    args.mix_images = args.mix_images or (20 if quick else 40)
    args.steps = args.steps or (4 if quick else 6)
    args.rounds = args.rounds or (5 if quick else 8)
    args.valid_rounds = max(1, args.valid_rounds or (2 if quick else 4))
    args.precision_rounds = max(1, args.precision_rounds or (2 if quick else 4))
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
    run = {"started": time.time(), "load_start": os.getloadavg()[0],
           "busy_start": _busy_seconds()}
    tmp = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
    try:
        r = run_measures(args, tmp) | run
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    precision = [line for case in r.get("precision", []) for line in precision_lines(case) + [""]]
    if args.precision_only:
        print("\n".join(header_lines(r, summarise_load(r), args) + [""] + precision))
        print(json.dumps({"precision": {c["encoder"]: precision_json(c) for c in r["precision"]}}
                         | load_json(r, summarise_load(r))))
        return 0
    s = summarise(r)
    lines = (header_lines(r, s, args) + [""] + speed_lines(r, s, args)
             + validation_lines(r, args) + [""] + image_lines(r, s, args) + [""]
             + memory_lines(r, s, args) + [""] + precision + target_lines(r, s))
    print("\n".join(lines))
    print(json.dumps(summary_json(r, s, args)))
    return 0


def run_precision(args, r, say):
    r["precision"] = []
    if args.skip_precision:
        return r
    for encoder, size in PRECISION_CASES:
        say(f"precision, {encoder} {size[0]}x{size[1]} ...")
        steps = (2 if args.quick else 3) if size[0] > 200 else (4 if args.quick else 8)
        r["precision"].append(measure_precision(encoder, size, args.batch, steps,
                                                args.precision_rounds))
        say("\n".join(precision_lines(r["precision"][-1])))  # kept if a later case is stopped
    return r


def run_measures(args, tmp):
    """Every measure, in order, on data generated under tmp; their raw results."""
    r = {"sizes": [SIZE_CYCLE[i % len(SIZE_CYCLE)] for i in range(args.mix_images)]}
    say = lambda text: print(text, file=sys.stderr)  # noqa: E731
    if args.precision_only:
        return run_precision(args, r, say)
    say(f"writing {len(r['sizes'])} ISIC-size JPEGs and 2000 small ones to {tmp} ...")
    mix_pairs, r["mix_bytes"] = write_set(tmp / "mix", r["sizes"], seed=1)
    small_pairs, _ = write_set(tmp / "small", [SMALL_SOURCE] * 2000, seed=2)
    mix = ImageSet(mix_pairs, tmp / "mix", args.loader_size, args.batch, args.workers)
    small = ImageSet(small_pairs, tmp / "small", args.size, args.batch, args.workers)
    say("loader ...")
    r["loader"] = measure_loader(mix, min_seconds=2.0 if args.quick else 4.0)
    say(f"  {r['loader']}")
    say("building the cache of the 2000 small pairs ...")
    r["build_seconds"] = build_cache(small.pairs, small.root, small.size)
    say("training ...")
    r["alone"], r["pipeline"] = measure_training(
        small.subset(200), args.encoder,
        Rounds(args.steps, args.rounds, budget=45 if args.quick else 120))
    say(f"  model alone {r['alone']}, pipeline {r['pipeline']}")
    say("validation ...")
    r["valid"] = measure_validation(mix, args.encoder, args.valid_rounds, default_precision())
    say(f"  {r['valid']['rounds']}")
    say("--image ...")
    largest = max(mix_pairs, key=lambda p: p.image.stat().st_size)
    r["largest_mb"] = largest.image.stat().st_size / 1e6
    r["largest_hw"] = preprocess.image_info(largest.image)
    r["image"] = measure_image(largest.image, largest.mask, args.image_encoder,
                               args.loader_size, repeats=2 if args.quick else 3)
    say(f"  {r['image']}")
    say("memory ...")
    r["memory"] = {n: measure_memory(tmp / "small", n, args) for n in (200, 2000)}
    return run_precision(args, r, say)


def summarise_load(r):
    """Wall time, cores, and the cores other processes took on average during the run."""
    wall = time.time() - r["started"]
    return {"wall": wall, "cores": os.cpu_count(), "load_end": os.getloadavg()[0],
            "others": None if r["busy_start"] is None else
            max(0.0, (_busy_seconds() - r["busy_start"] - _own_seconds()) / wall)}


def load_json(r, s):
    return {"load_avg_start": round(r["load_start"], 2), "load_avg_end": round(s["load_end"], 2),
            "other_cores": None if s["others"] is None else round(s["others"], 2),
            "seconds": round(s["wall"], 1)}


def summarise(r):
    """The derived figures: speed and memory ratios, and the CPU other processes took."""
    memory, image = r["memory"], r["image"]
    s = summarise_load(r) | {
         "cache_speedup": r["loader"]["cached"][0] / r["loader"]["uncached"][0],
         "model_ips": max(r["alone"]), "pipe_ips": max(r["pipeline"]),  # see measure_training
         "median_share": statistics.median(b / a for a, b in zip(r["alone"], r["pipeline"])),
         "memory_growth": memory[2000]["peak_rss_sum_mb"] / memory[200]["peak_rss_sum_mb"],
         "main_growth": memory[2000]["main_peak_rss_mb"] / memory[200]["main_peak_rss_mb"],
         "pss_growth": memory[2000]["tree_peak_pss_mb"] / memory[200]["tree_peak_pss_mb"],
         "io_total": image["read"] + image["preprocess"] + image["model"] + image["write"]}
    s["pipeline_share"] = s["pipe_ips"] / s["model_ips"]
    return s


def header_lines(r, s, args):
    sizes, cores, others = r["sizes"], s["cores"], s["others"]
    mix = ", ".join(f"{w}x{h} {sizes.count((w, h)) / len(sizes):.0%}"
                    for w, h in sorted(set(sizes)))
    sources = [] if "mix_bytes" not in r else [
        f"sources: {len(sizes)} generated JPEGs (q{JPEG_QUALITY}, {r['mix_bytes'] / 1e6:.0f} MB, "
        f"{r['mix_bytes'] / sum(w * h for w, h in sizes):.2f} B/px) + PNG 0/255 masks; "
        f"sizes: {mix}"]
    return [
        f"pipeline benchmark{' (--quick)' if args.quick else ''}: {cores} CPU cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"loader workers {args.workers}"
        f"{' (train_model.py WORKERS)' if args.workers == TRAIN.WORKERS else ''}, "
        f"batch {args.batch}",
        "CPU precision by default: "
        + device_lib.precision_line(CPU, TRAIN.MIXED_PRECISION, TRAIN.CHANNELS_LAST)
        + ("" if device_lib.cpu_has_native_bf16() else "; the bf16 rows below run in float32"),
        *sources,
        f"load average {r['load_start']:.1f} at start, {s['load_end']:.1f} at the end; other "
        f"processes used "
        + ("?" if others is None else f"{others:.2f}") + f" of the {cores} cores on average "
        f"during the run" + ("  ** shared machine: timings are noisy **"
                             if others is not None and others > 0.2 else ""),
    ]


def row(label, ips, seconds=None, note="", digits=1):
    """One line of the results table."""
    return (f"{label:<58}{ips:>10.{digits}f}"
            f"{'' if seconds is None else f'{seconds:.2f}':>10}{note}")


def speed_lines(r, s, args):
    loader, (ly, lx), (ty, tx) = r["loader"], args.loader_size, args.size
    return [
        f"{'measure':<58}{'images/s':>10}{'seconds':>10}",
        row(f"loader {ly}x{lx}, no cache (decode + resize every time)", *loader["uncached"]),
        row(f"loader {ly}x{lx}, first pass (builds the cache)", *loader["first"]),
        row(f"loader {ly}x{lx}, from the cache", *loader["cached"]),
        f"{'  cache_speedup (cached / no cache)':<58}{s['cache_speedup']:>10.1f}",
        row("cache build, 2000 pairs 640x480, PreprocessCache.build",
            2000 / r["build_seconds"], r["build_seconds"]),
        row(f"training {args.encoder} FPN {ty}x{tx}, model alone (batches in RAM)",
            s["model_ips"], None, "   rounds: " + " ".join(f"{x:.1f}" for x in r["alone"]), 2),
        row("training, full pipeline (cached loader+workers+augment)", s["pipe_ips"], None,
            "   rounds: " + " ".join(f"{x:.1f}" for x in r["pipeline"]), 2),
        f"{'  pipeline_share (best round over best round)':<58}{s['pipeline_share']:>10.3f}"
        f"   median of per-round ratios: {s['median_share']:.3f}",
    ]


def validation_lines(r, args):
    v, (ly, lx) = r["valid"], args.loader_size
    extra = v["peak_extra_mb"]
    memory = "" if None in extra.values() else \
        f"; main process peak RSS above a pass's start: network {extra['network']:.0f} MB, " \
        f"original {extra['original']:.0f} MB"
    return [
        row(f"validation {args.encoder} FPN {ly}x{lx}, at network size", v["network_ips"],
            v["network_s"], "   forward + loss + batch_confusion", 2),
        row("validation at original size (engine.validate's loop)", v["original_ips"],
            v["original_s"], "   + resize, cut, score per image", 2),
        f"{'  valid_original_over_network (seconds, best rounds)':<58}{v['ratio']:>10.3f}"
        f"   median of per-round ratios: {v['median_ratio']:.3f}",
        f"  ({v['images']} ISIC-size images, {v['pixels'] / 1e6:.0f} MP of true masks, from the "
        f"cache, {max(1, args.workers)} scoring thread(s), best of {args.valid_rounds} "
        f"alternating rounds{memory})",
    ]


def image_lines(r, s, args):
    image, io_total, (ly, lx) = r["image"], s["io_total"], args.loader_size
    return [
        f"test_model --image, {r['largest_mb']:.1f} MB {r['largest_hw']['width']}x"
        f"{r['largest_hw']['height']} JPEG, {args.image_encoder} {TRAIN.ARCH} at {ly}x{lx}, CPU "
        f"(median of {2 if args.quick else 3}):",
        "  " + ", ".join(f"{k} {image[k]:.3f} s" for k in ("read", "preprocess", "model", "write"))
        + f"; model share {image['model'] / io_total:.0%} of {io_total:.2f} s",
        "  (write = upsample to full size + threshold + PNG; the map written is a trained-like "
        "blurred lesion, not the untrained model's speckle)",
        f"  check: predict.predict (read to upsample) {image['predict']:.3f} s; the whole "
        f"script once, as a subprocess (start-up, checkpoint, mask, overlay figure of the "
        f"untrained model's map) {image['script']:.1f} s",
    ]


def memory_lines(r, s, args):
    memory, (ty, tx) = r["memory"], args.size
    steps = "every batch" if args.memory_steps <= 0 else f"the first {args.memory_steps} batches"
    lines = [f"peak memory, one epoch from the cache ({ty}x{tx}, all batches loaded, model "
             f"step on {steps}):"]
    for n in (200, 2000):
        m = memory[n]
        lines.append(f"  {n:>5} images: peak RSS main {m['main_peak_rss_mb']:.0f} + workers "
                     f"{' + '.join(f'{x:.0f}' for x in m['worker_peak_rss_mb'])} = "
                     f"{m['peak_rss_sum_mb']:.0f} MB; sampled PSS of all "
                     f"{m['tree_peak_pss_mb']:.0f} MB ({m['images_loaded']} images loaded, "
                     f"{m['images_trained']} trained)")
    lines.append(f"{'  memory_growth (2000 / 200, summed peak RSS)':<58}"
                 f"{s['memory_growth']:>10.3f}   main alone {s['main_growth']:.3f}, "
                 f"sampled PSS {s['pss_growth']:.3f}")
    return lines


def target_lines(r, s):
    def verdict(ok):
        return "ok" if ok else "MISSED"

    lines = [f"targets: cache_speedup >= 10: {verdict(s['cache_speedup'] >= 10)}; "
             f"pipeline_share >= 0.90: {verdict(s['pipeline_share'] >= 0.90)}; "
             f"memory_growth <= 1.10: {verdict(s['memory_growth'] <= 1.10)}; "
             f"valid_original_over_network <= 2: {verdict(r['valid']['ratio'] <= 2)}"
             f"  ({time.time() - r['started']:.0f} s)"]
    if s["others"] is not None and s["others"] > 0.5:
        lines.append(f"** other processes held {s['others']:.2f} of {s['cores']} cores: the "
                     f"speed figures of this run are not trustworthy; rerun on a quiet machine **")
    return lines


def summary_json(r, s, args):
    loader, memory, v = r["loader"], r["memory"], r["valid"]
    return {
        "cache_speedup": round(s["cache_speedup"], 2),
        "pipeline_share": round(s["pipeline_share"], 3),
        "valid_original_over_network": round(v["ratio"], 3),
        "memory_growth": round(s["memory_growth"], 3),
        "memory_growth_main_rss": round(s["main_growth"], 3),
        "memory_growth_pss": round(s["pss_growth"], 3),
        "loader_uncached_ips": round(loader["uncached"][0], 2),
        "loader_first_pass_ips": round(loader["first"][0], 2),
        "loader_cached_ips": round(loader["cached"][0], 1),
        "model_alone_ips": round(s["model_ips"], 3), "pipeline_ips": round(s["pipe_ips"], 3),
        "pipeline_share_median_round": round(s["median_share"], 3),
        "valid_network_ips": round(v["network_ips"], 2),
        "valid_original_ips": round(v["original_ips"], 2),
        "valid_ratio_median_round": round(v["median_ratio"], 3),
        "valid_peak_extra_mb": {k: None if x is None else round(x) for k, x in
                                v["peak_extra_mb"].items()},
        "image_seconds": {k: round(x, 4) for k, x in r["image"].items()},
        "peak_rss_sum_mb": {str(n): round(memory[n]["peak_rss_sum_mb"], 1) for n in memory},
        "quick": args.quick, "cores": s["cores"], "workers": args.workers,
        "encoder": args.encoder, "train_size": list(args.size),
        "loader_size": list(args.loader_size), "batch": args.batch,
        "precision": {c["encoder"]: precision_json(c) for c in r["precision"]}} \
        | load_json(r, s)


if __name__ == "__main__":
    sys.exit(main())
