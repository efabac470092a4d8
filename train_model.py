"""Train the FPN of "Semantic Segmentation for Skin Melanoma Detection" on ISIC images.

    python train_model.py                 # the paper's settings, data in data/
    python train_model.py --demo          # a minute or a few on a laptop CPU, generated data
    python train_model.py --resume        # continue a stopped run on the same schedule
    torchrun --nproc_per_node=4 train_model.py   # 4 GPUs, one process each (DDP)

Edit the constants below for an experiment, or pass the matching flag.
"""
import argparse
import csv
import io
import math
import os
import shutil
import sys
import time
from pathlib import Path

# ----------------------------------------------------------------------------- settings
DATA_DIR = "data"                  # folder with the ISIC folders (see data/README.md)
MODEL_DIR = "Model"                # checkpoints, per-epoch CSV and curves go here
ENCODER = "se_resnext50_32x4d"     # FPN encoder; the paper's code used se_resnext50_32x4d
ENCODER_WEIGHTS = "imagenet"       # "imagenet" (downloaded), None (from scratch) or a local file
ENCODER_DEPTH = 5                  # down-sampling stages: image sides must be multiples of 2**5
IMAGE_SIZE = (320, 320)            # (height, width) every image is resized to
MEAN = (0.485, 0.456, 0.406)       # input normalisation (of 0..1 pixels): ImageNet's, which the
STD = (0.229, 0.224, 0.225)        #   pretrained encoders expect; saved in every checkpoint
BATCH_SIZE = 8                     # images per training step
EPOCHS = 40                        # the paper's 40 epochs
LR = 1e-4                          # Adam's learning rate for the first LR_DROP_EPOCH epochs
LR_DROP_EPOCH = 25                 # epochs 1..25 run at LR, epochs 26.. at LR_AFTER_DROP
LR_AFTER_DROP = 1e-5               # the rate after the drop
LOSS = "dice"                      # "dice" (the paper's) or "dice+bce"
AUGMENT = "full"                   # training augmentation: "full" (flips, 90-degree turns, small
                                   #   affine moves, colour jitter) or "flips" (flips and turns)
FOLDS = 1                          # K > 1: cross-validation, one run per fold (--fold I)
THRESHOLD = 0.5                    # probability at or above which a pixel is lesion
SEED = 42                          # one seed for the split, the model's start and the shuffling
WORKERS = min(8, max(1, (os.cpu_count() or 1) - 1))  # loader processes; one core left to the model
DEVICE = "auto"                    # "auto" (CUDA when present), "cuda" or "cpu"
CACHE = True                       # decode and resize each image once, then read the small copy
MIXED_PRECISION = True             # bfloat16 (or float16) autocast on CUDA; bfloat16 on CPUs
                                   #   with native bf16 (AVX-512 BF16, AMX); else float32
CHANNELS_LAST = True               # channels_last memory format, on CUDA and under CPU bfloat16
CUDNN_BENCHMARK = True             # let cuDNN pick the fastest kernels for the fixed input size
DETERMINISTIC = False              # CUDA only: deterministic kernels, runs repeat bit for bit
                                   #   (slower; turns CUDNN_BENCHMARK off)
SYNC_BATCHNORM = False             # under torchrun: batch-norm statistics over all processes

# --demo: sized for a 2-core CPU in a minute or two; outputs under names no one takes for ISIC
DEMO = dict(data="data/demo", model_dir="Model/demo", encoder="resnet18", encoder_weights=None,
            image_size=(96, 96), batch_size=8, epochs=8, lr=1e-3, lr_drop_epoch=6,
            lr_after_drop=1e-4)
# ---------------------------------------------------------------------------------------

import numpy as np  # noqa: E402  (the settings above come first, as a reader looks for them)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402

import demo_data  # noqa: E402
import load_dataset  # noqa: E402
import metrics  # noqa: E402
import model as model_lib  # noqa: E402
import preprocess  # noqa: E402
from model import CheckpointError, SettingError  # noqa: E402

LISTED_FILES = 20  # corrected/skipped files named on the console; the data report lists all
CHECKPOINT_COPIES = 7  # model sizes on disk at the worst moment: best + last (3x, with Adam's
                       # two moments) + the temporary copy of the last being written


class NonFiniteLoss(RuntimeError):
    """The loss or the model became NaN or infinite; the message names the epoch and step."""


class Interrupted(Exception):
    """Ctrl-C during training; the message says which epoch the resume state holds."""


# ----------------------------------------------------------------------------- processes

def world_size():
    """Processes training together: torchrun's WORLD_SIZE, 1 for a plain `python` run."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    return dist.get_rank() if world_size() > 1 else 0


def main_process():
    """Only the first process prints, writes the CSV, the figures and the checkpoints."""
    return rank() == 0


def gather(values):
    """Every process's list of values, concatenated in rank order (one process: as is)."""
    if world_size() == 1:
        return list(values)
    everyone = [None] * world_size()
    dist.all_gather_object(everyone, list(values))
    return [v for part in everyone for v in part]


def sum_over_processes(*numbers):
    if world_size() == 1:
        return numbers
    total = torch.tensor(numbers, dtype=torch.float64)
    dist.all_reduce(total)  # a CPU tensor: gloo carries it (beside NCCL on CUDA runs)
    return tuple(total.tolist())


# ----------------------------------------------------------------------------- schedule

def lr_for_epoch(epoch, lr=LR, drop_epoch=LR_DROP_EPOCH, lr_after=LR_AFTER_DROP):
    """Learning rate of a 1-based epoch: LR through epoch `drop_epoch`, then LR_AFTER_DROP.

    A rule on the epoch number, so a resumed run lands on the same schedule."""
    return lr if epoch <= drop_epoch else lr_after


def make_optimizer(model, lr, device):
    """Adam over every parameter. On the CPU its fused kernel: the per-parameter loop took
    12-16% of a resnet18 step at 128x128 there, the fused one a seventh of that (README,
    Speed); CUDA keeps torch's default (foreach) implementation."""
    return torch.optim.Adam(model.parameters(), lr=lr,
                            fused=True if device.type == "cpu" else None)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:  # every group, not only the decoder's
        group["lr"] = lr


# ----------------------------------------------------------------------------- loops

def train_one_epoch(model, loader, loss_fn, optimizer, device, epoch, iter_log, scaler=None,
                    mixed=False, channels_last=False, threshold=THRESHOLD, progress=True,
                    stats=None):
    """One pass over the training loader; returns the mean training loss.

    `iter_log` receives (loss, mean IoU of the batch at network size) per step: the paper's
    Figures 8 and 9. `stats`, when a dict, receives "images": how many were trained on (fewer
    than the loader holds when files became unreadable during the run)."""
    model.train()
    total, seen, skipped = 0.0, 0, 0
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not progress)
    for step, batch in enumerate(bar, 1):
        # every file of the batch became unreadable: skip the step, and under torchrun every
        # process skips it, or the others would wait in the gradient all-reduce for this one
        # (a second small all-reduce per step beside the NaN flag below)
        (empty,) = sum_over_processes(1.0 if batch is None else 0.0)
        if empty:
            skipped += 0 if batch is None else len(batch[0])  # read, but skipped with it
            continue
        images, masks = model_lib.to_device(batch[0], device, channels_last), batch[1].to(device)
        with model_lib.autocast(device, mixed):
            logits = model(images)
        loss = loss_fn(logits.float(), masks)  # the loss in float32: float16 sums overflow
        loss_value = loss.item()  # one device sync per step, reused below
        # under torchrun every process learns of a NaN anywhere and stops at the same step
        (broken,) = sum_over_processes(0.0 if math.isfinite(loss_value) else 1.0)
        if broken:
            # before the optimiser step: the weights and every checkpoint stay as they were
            value = loss_value if not math.isfinite(loss_value) else "NaN in another process"
            raise NonFiniteLoss(f"the training loss became {value} at epoch {epoch}, "
                                f"step {step}; stopped before updating the model (the best "
                                f"checkpoint is untouched). Lower LR, or turn MIXED_PRECISION "
                                f"off.")
        model_lib.optimizer_step(loss, optimizer, scaler)
        with torch.no_grad():
            counts = metrics.batch_confusion(torch.sigmoid(logits.float()), masks, threshold)
        n = images.shape[0]
        total += loss_value * n
        seen += n
        iter_log.append((loss_value, metrics.mean_scores(counts.tolist())["iou"]))
        bar.set_postfix(loss=f"{total / seen:.4f}")
    total, seen, skipped = sum_over_processes(total, seen, skipped)
    if stats is not None:
        stats["images"], stats["skipped"] = int(seen), int(skipped)
    return total / max(seen, 1)


@torch.inference_mode()
def validate(model, loader, loss_fn, device, threshold=THRESHOLD, mixed=False,
             channels_last=False, threads=2):
    """Mean loss (at network size) and per-image mean scores at each image's original size.

    Each probability map is resized to its true mask's size and cut at `threshold` exactly as
    test_model.py --evaluate does, so the CSV, the choice of the best checkpoint and the
    evaluation report the same numbers. The true masks come with the batches (packed bits,
    from the cache): no original is decoded per epoch or held beyond its batch."""
    model.eval()
    losses = []

    def per_image():
        for batch in loader:
            if batch is None:
                continue
            images, masks, _, truths = batch
            with model_lib.autocast(device, mixed):
                logits = model(model_lib.to_device(images, device, channels_last)).float()
            losses.append((loss_fn(logits, masks.to(device)).item(), len(images)))
            for prob, (bits, hw) in zip(torch.sigmoid(logits)[:, 0].cpu().numpy(), truths):
                yield prob, bits, hw

    def score(prob, bits, hw):  # in the scoring threads, beside the model
        return metrics.confusion_at_original(prob, preprocess.unpack_truth(bits, hw), threshold)

    # each process scores its share of the images; every image is counted once, everywhere
    counts = gather(preprocess.ordered_map(score, per_image(), threads))
    result = metrics.mean_scores(counts)
    total, seen = sum_over_processes(sum(loss * n for loss, n in losses),
                                     sum(n for _, n in losses))
    result["loss"] = total / seen if seen else float("nan")
    return result


# ----------------------------------------------------------------------------- logs

LOG_COLUMNS = ["epoch", "lr", "train_loss", "valid_loss", "valid_iou", "valid_dice",
               "valid_threshold_jaccard", "seconds"]


def write_log(rows, path):
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=LOG_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    preprocess.write_text(path, text.getvalue())


def plot_curves(rows, iter_log, path, title):
    """Per-iteration training loss and IoU, and per-epoch validation curves, in one figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    if iter_log:
        losses, ious = np.array(iter_log).T
        steps = np.arange(1, len(losses) + 1)
        axes[0].plot(steps, losses, lw=0.6, color="tab:blue")
        axes[0].set(title="training loss per iteration", xlabel="iteration", ylabel="loss")
        axes[1].plot(steps, ious, lw=0.6, color="tab:green")
        axes[1].set(title="training IoU per iteration (network size)", xlabel="iteration",
                    ylabel="IoU", ylim=(0, 1))
    epochs = [r["epoch"] for r in rows]
    axes[2].plot(epochs, [r["train_loss"] for r in rows], "o-", label="train loss")
    axes[2].plot(epochs, [r["valid_loss"] for r in rows], "o-", label="valid loss")
    axes[2].plot(epochs, [r["valid_iou"] for r in rows], "s-", label="valid IoU (original size)")
    axes[2].plot(epochs, [r["valid_dice"] for r in rows], "^--", label="valid Dice")
    axes[2].set(title="per epoch", xlabel="epoch", ylim=(0, 1))
    axes[2].legend(loc="center right")
    fig.suptitle(title)
    fig.tight_layout()
    with preprocess.atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


# ----------------------------------------------------------------------------- settings

def parse_args(argv=None):
    def weights(value):
        return None if value.lower() in ("none", "null", "") else value

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=DATA_DIR, help="data folder")
    p.add_argument("--model-dir", default=MODEL_DIR, help="output folder")
    p.add_argument("--encoder", default=ENCODER)
    p.add_argument("--encoder-weights", type=weights, default=ENCODER_WEIGHTS,
                   help="imagenet | none | PATH to a local weights file")
    p.add_argument("--encoder-depth", type=int, default=ENCODER_DEPTH)
    p.add_argument("--image-size", type=int, nargs=2, default=IMAGE_SIZE, metavar=("H", "W"))
    p.add_argument("--mean", type=float, nargs=3, default=MEAN, metavar=("R", "G", "B"))
    p.add_argument("--std", type=float, nargs=3, default=STD, metavar=("R", "G", "B"))
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--lr-drop-epoch", type=int, default=LR_DROP_EPOCH)
    p.add_argument("--lr-after-drop", type=float, default=LR_AFTER_DROP)
    p.add_argument("--loss", default=LOSS, choices=["dice", "dice+bce"])
    p.add_argument("--augment", default=AUGMENT, choices=preprocess.AUGMENTS)
    p.add_argument("--folds", type=int, default=FOLDS, help="K folds of the training pairs")
    p.add_argument("--fold", type=int, default=None,
                   help="with --folds K: the fold (0..K-1) that validates; the others train")
    p.add_argument("--threshold", type=float, default=THRESHOLD)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--workers", type=int, default=WORKERS)
    p.add_argument("--device", default=DEVICE, choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-cache", dest="cache", action="store_false", default=CACHE,
                   help="decode every image every epoch (no preprocessed cache)")
    p.add_argument("--deterministic", action="store_true", default=DETERMINISTIC,
                   help="CUDA: deterministic kernels (slower)")
    p.add_argument("--resume", action="store_true", help="continue from the saved state")
    p.add_argument("--redraw-split", action="store_true",
                   help="draw the train/valid/test split anew (after the data changed)")
    p.add_argument("--demo", action="store_true",
                   help="train on generated demo data with CPU-sized settings")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.demo:  # demo settings replace only what the command line does not set
        unset = object()  # a default no flag can produce
        p.set_defaults(**{key: unset for key in DEMO})
        again = p.parse_args(argv)
        for key, value in DEMO.items():
            if getattr(again, key) is unset:
                setattr(args, key, value)
    args.image_size, args.mean, args.std = (tuple(args.image_size), tuple(args.mean),
                                            tuple(args.std))
    return args


def check_settings(args):
    """Refuse, in one line naming the constant, a setting that cannot work."""
    if not 3 <= args.encoder_depth <= 5:
        raise SettingError(f"ENCODER_DEPTH={args.encoder_depth}: the FPN needs 3, 4 or 5")
    size_ok = preprocess.permitted_size(args.image_size, args.encoder_depth)
    if size_ok != args.image_size:
        raise SettingError(f"IMAGE_SIZE={args.image_size} breaks the size rule: each side must "
                           f"be a multiple of 2**{args.encoder_depth} = {2 ** args.encoder_depth}"
                           f" (nearest: {size_ok})")
    model_lib.check_encoder(args.encoder)
    if not 0.0 < args.threshold < 1.0:
        raise SettingError(f"THRESHOLD={args.threshold} must lie between 0 and 1")
    for constant, value in (("EPOCHS", args.epochs), ("BATCH_SIZE", args.batch_size)):
        if value < 1:
            raise SettingError(f"{constant}={value} must be at least 1")
    for constant, value in (("LR", args.lr), ("LR_AFTER_DROP", args.lr_after_drop)):
        if not value > 0:  # NaN fails this too
            raise SettingError(f"{constant}={value} must be greater than 0")
    if not all(s > 0 for s in args.std):
        raise SettingError(f"STD={args.std} must be greater than 0")
    if args.workers < 0:
        raise SettingError(f"WORKERS={args.workers} must be 0 or more")
    if args.folds < 1 or (args.folds > 1) != (args.fold is not None) or \
            (args.fold is not None and not 0 <= args.fold < args.folds):
        raise SettingError(f"FOLDS={args.folds} with --fold {args.fold}: pass --fold I with "
                           f"0 <= I < FOLDS when FOLDS > 1, and no --fold otherwise")


def check_writable(folder):
    """Fail before any training if the outputs cannot be written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test.{os.getpid()}"  # one per process under torchrun
        probe.write_bytes(b"0" * 1024)
        probe.unlink()
    except OSError as exc:
        raise SettingError(f"MODEL_DIR={str(folder)!r} cannot be written: "
                           f"{exc.strerror or exc}") from None


def output_paths(args):
    folder = Path(args.model_dir)
    stem = f"demo_{args.encoder}" if args.demo else args.encoder
    if args.fold is not None:
        stem += f"_fold{args.fold}"
    return {"best": folder / f"{stem}.pth", "last": folder / f"{stem}_last.pth",
            "log": folder / f"{stem}_log.csv", "curves": folder / f"{stem}_curves.png",
            "data_report": folder / f"{stem}_data.txt"}


def input_settings(args):
    return preprocess.InputSettings(args.image_size, preprocess.INTERPOLATION, args.mean,
                                    args.std)


# ----------------------------------------------------------------------------- data

def load_splits(args, report_path):
    """Scan the data, draw (or read) the split, report corrected and skipped files.

    Under torchrun the first process does it first and fills the cache, so that the memo,
    the split file and the cache entries are written once; the others then read them."""
    if not main_process():
        dist.barrier()
    found, splits, split_file = scan_and_split(args, report_path)
    if main_process() and world_size() > 1:
        if args.cache:
            preprocess.PreprocessCache(load_dataset.cache_dir_for(args.data),
                                       args.image_size).build(splits["train"] + splits["valid"],
                                                              progress=not args.quiet)
        dist.barrier()
    return found, splits, split_file


def scan_and_split(args, report_path):
    if args.demo and not any(Path(args.data).glob("*Training_Input*")):
        print(f"making demo data in {args.data} ...")
        demo_data.make_demo(args.data)
    found = load_dataset.scan(args.data, progress=not args.quiet)
    if not any(found.splits.values()):
        raise SettingError(load_dataset.no_data_message(args.data))
    split_file = load_dataset.split_file_for(args.data)
    if args.redraw_split:
        split_file.unlink(missing_ok=True)
    splits = load_dataset.split_pairs(found, seed=args.seed, split_file=split_file)
    if args.fold is not None:
        splits = load_dataset.fold_splits(found, splits, args.folds, args.fold, args.seed,
                                          split_file)
    if main_process():
        report_data(found, splits, args, report_path)
    if args.batch_size > len(splits["train"]):
        raise SettingError(f"BATCH_SIZE={args.batch_size} is larger than the training split "
                           f"({len(splits['train'])} images)")
    if not splits["valid"]:
        raise SettingError("the validation split is empty: add data or raise VALID_FRACTION "
                           "in load_dataset.py")
    return found, splits, split_file


def report_data(found, splits, args, report_path):
    """Pairs per split on one line, then the corrected and skipped files by name.

    The console names the first LISTED_FILES of each kind; the report file beside the model
    lists them all, so a long run's log never hides which files were left out."""
    print(f"data: {found.layout} in {args.data}: " + ", ".join(
        f"{len(v)} {k}" for k, v in splits.items()) +
        f"; {len(found.corrected)} corrected, {len(found.skipped)} skipped"
        + (f" (all listed in {report_path})" if found.corrected or found.skipped else ""))
    for kind, entries in (("skipped", found.skipped), ("corrected", found.corrected)):
        for path, why in entries[:LISTED_FILES]:
            print(f"  {kind} {os.path.relpath(path, found.root)}: "
                  f"{why.replace(f'{found.root}{os.sep}', '')}")
        if len(entries) > LISTED_FILES:
            print(f"  ... and {len(entries) - LISTED_FILES} more {kind} (see {report_path})")
    preprocess.write_text(report_path, found.summary() + "\n" + "\n".join(
        f"Split {k}: {len(v)} pairs" for k, v in splits.items()) + "\n")


def make_loaders(splits, args, device):
    cache = None
    if args.cache:
        cache = preprocess.PreprocessCache(load_dataset.cache_dir_for(args.data),
                                           args.image_size)
    common = dict(settings=input_settings(args), batch_size=args.batch_size,
                  workers=args.workers, cache=cache, seed=args.seed,
                  pin_memory=device.type == "cuda", rank=rank(), world=world_size())
    return (load_dataset.make_loader(splits["train"], train=True, augment=args.augment,
                                     **common),
            load_dataset.make_loader(splits["valid"], truth=True, **common))


# ----------------------------------------------------------------------------- device

def setup_processes(args):
    """Under torchrun: join the process group (NCCL for CUDA tensors with gloo for the small CPU
    ones, or gloo alone on the CPU), one process per GPU; rank > 0 stays silent. A plain
    `python train_model.py` sets nothing up."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return
    device = model_lib.pick_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # NCCL reduces CUDA tensors only; the small counts and flags (sum_over_processes,
    # gather) are CPU tensors and objects, which gloo carries beside it
    backend, carriers = (("cpu:gloo,cuda:nccl", "NCCL, with gloo for CPU tensors")
                         if device.type == "cuda" else ("gloo", "gloo"))
    dist.init_process_group(backend)
    if not main_process():
        sys.stdout = open(os.devnull, "w")  # one console: the first process speaks for all
        args.quiet = True
    print(f"{world} processes on {device.type} ({carriers}); BATCH_SIZE={args.batch_size} per "
          f"process, {world * args.batch_size} per step")


def setup_device(args):
    """The device, and what runs on it: (device, mixed precision?, channels_last?)."""
    device = model_lib.pick_device(args.device)
    if device.type == "cpu":
        mixed = model_lib.autocast_dtype(device, MIXED_PRECISION) is not None
        channels_last = model_lib.use_channels_last(device, CHANNELS_LAST, mixed)
        print(f"device: CPU (no CUDA device in use; training is far slower than on a GPU), "
              f"{model_lib.precision_line(device, MIXED_PRECISION, CHANNELS_LAST)}")
        return device, mixed, channels_last
    if world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    print(f"device: {torch.cuda.get_device_name()}")
    torch.backends.cudnn.benchmark = CUDNN_BENCHMARK and not args.deterministic
    if args.deterministic:  # the documented cost: slower kernels, no autotuning
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
    return device, MIXED_PRECISION, CHANNELS_LAST


def warn_if_disk_low(folder, model):
    """One line when the output disk may fill before the first checkpoints are written."""
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    needed = CHECKPOINT_COPIES * model_bytes
    free = shutil.disk_usage(folder).free
    if free < needed:
        print(f"warning: only {free / 2**20:.0f} MB free for {folder}; the checkpoints need "
              f"about {needed / 2**20:.0f} MB: free some space or pass another --model-dir")


# cuDNN and cuBLAS report a failed allocation as a plain RuntimeError with these words
GPU_OOM_WORDS = ("CUDA out of memory", "CUDA error: out of memory", "CUDNN_STATUS_ALLOC_FAILED",
                 "CUBLAS_STATUS_ALLOC_FAILED")


def gpu_out_of_memory(exc):
    return isinstance(exc, torch.cuda.OutOfMemoryError) or any(w in str(exc)
                                                              for w in GPU_OOM_WORDS)


# ----------------------------------------------------------------------------- state

RESUME_SETTINGS = (("encoder", "ENCODER", "--encoder"),
                   ("encoder_depth", "ENCODER_DEPTH", "--encoder-depth"),
                   ("image_size", "IMAGE_SIZE", "--image-size"),
                   ("mean", "MEAN", "--mean"), ("std", "STD", "--std"),
                   ("threshold", "THRESHOLD", "--threshold"))  # which epoch is best
# the recipe: a resume under other values would not end as the straight run does. EPOCHS may
# change (to extend a run). States written before the recipe was saved: seed and folds only.
RESUME_RECIPE = (("seed", "SEED", "--seed"), ("folds", "FOLDS", "--folds"),
                 ("batch_size", "BATCH_SIZE", "--batch-size"), ("lr", "LR", "--lr"),
                 ("lr_drop_epoch", "LR_DROP_EPOCH", "--lr-drop-epoch"),
                 ("lr_after_drop", "LR_AFTER_DROP", "--lr-after-drop"),
                 ("loss", "LOSS", "--loss"), ("augment", "AUGMENT", "--augment"))


def recipe(args):
    """The training settings a resume must share, as saved in every checkpoint."""
    return {key: getattr(args, key) for key, _, _ in RESUME_RECIPE}


def load_resume_state(path, args):
    """The saved state of an interrupted run, refused when it was made with other settings."""
    state = model_lib.load_checkpoint(path)
    missing = [k for k in ("epoch", "best_iou", "optimizer_state", "history", "iter_log")
               if k not in state]
    if missing:
        raise CheckpointError(f"--resume: {path} is not a resume state (no {missing[0]!r}); "
                              f"delete it to start over")
    saved_recipe = state.get("recipe") or {k: state[k] for k in ("seed", "folds") if k in state}
    checks = [(state, setting) for setting in RESUME_SETTINGS] + [
        (saved_recipe, setting) for setting in RESUME_RECIPE if setting[0] in saved_recipe]
    for source, (key, constant, flag) in checks:
        saved, current = source.get(key), getattr(args, key)
        if isinstance(current, tuple):
            saved = tuple(saved or ())
        if saved != current:
            raise SettingError(f"--resume: {path} was made with {constant}={saved!r}, not "
                               f"{current!r}: use {flag} as then, or another --model-dir for a "
                               f"new run")
    return state


def start_training(args, paths, device, mixed):
    """(model, optimizer, scaler, progress) for a new run, or as the resume state left them."""
    state = None
    if args.resume and paths["last"].is_file():
        state = load_resume_state(paths["last"], args)
    elif args.resume:
        print(f"no saved state at {paths['last']}: starting from the beginning")
    torch.manual_seed(args.seed)
    if state is None:
        model = model_lib.build_model(args.encoder, args.encoder_weights, args.encoder_depth)
    else:
        model = model_lib.model_from_checkpoint(state, paths["last"])
    optimizer = make_optimizer(model, args.lr, device)
    # float16 needs the loss scaled; bfloat16 (CUDA or CPU) has float32's range
    scaler = torch.amp.GradScaler("cuda") \
        if model_lib.autocast_dtype(device, mixed) == torch.float16 else None
    progress = {"start": 1, "best_iou": -1.0, "rows": [], "iter_log": []}
    if state is not None:
        optimizer.load_state_dict(state["optimizer_state"])
        if scaler is not None and state.get("scaler_state"):
            scaler.load_state_dict(state["scaler_state"])
        progress = {"start": state["epoch"] + 1, "best_iou": state["best_iou"],
                    "rows": state["history"], "iter_log": [tuple(x) for x in state["iter_log"]]}
        print(f"resuming after epoch {state['epoch']} (best valid IoU {state['best_iou']:.4f})")
        if state.get("processes", world_size()) != world_size() and main_process():
            print(f"note: the state was saved by a run of {state['processes']} process(es), "
                  f"this one has {world_size()}: each process's share of an epoch changes, so "
                  f"the run will not end exactly as a straight one would")
    return model, optimizer, scaler, progress


def resume_state(model, settings, epoch, valid_iou, optimizer, scaler, progress, args):
    state = model_lib.checkpoint_record(model, settings, epoch, valid_iou)
    state.update(optimizer_state=optimizer.state_dict(), best_iou=progress["best_iou"],
                 scaler_state=scaler.state_dict() if scaler is not None else None,
                 history=progress["rows"], iter_log=[list(x) for x in progress["iter_log"]],
                 epochs=args.epochs, processes=world_size())
    return state


def check_epoch_finite(valid, model, epoch):
    """Stop before saving anything when validation shows a broken (NaN or inf) model."""
    if valid["images"] and not (math.isfinite(valid["loss"]) and math.isfinite(valid["iou"])):
        raise NonFiniteLoss(f"the validation loss became {valid['loss']} (IoU {valid['iou']}) "
                            f"at epoch {epoch}; stopped before saving (the best checkpoint "
                            f"and the resume state keep the previous epoch). Lower LR.")
    if not model_lib.weights_finite(model):
        raise NonFiniteLoss(f"the model's weights became NaN or infinite at epoch {epoch}; "
                            f"stopped before saving (the best checkpoint is untouched). "
                            f"Lower LR.")


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    try:
        return run_and_report(args)
    finally:
        if world_size() > 1:
            dist.destroy_process_group()


def run_and_report(args):
    try:
        return run(args)
    except NonFiniteLoss as exc:  # every process stops at once; the first one says why
        sys.exit(f"error: {exc}" if main_process() else 1)
    except (SettingError, CheckpointError, load_dataset.SplitMismatch) as exc:
        sys.exit(f"error: {exc}")
    except (Interrupted, KeyboardInterrupt) as exc:
        message = str(exc) if isinstance(exc, Interrupted) else \
            "interrupted before training started: nothing was saved"
        tqdm.write(f"interrupted: {message}", file=sys.stderr)  # tqdm.write clears a bar first
        sys.exit(130)  # 128 + SIGINT, as a shell reports Ctrl-C
    except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is one
        if not gpu_out_of_memory(exc):
            raise
        sys.exit(f"error: the GPU ran out of memory at BATCH_SIZE={args.batch_size}, "
                 f"IMAGE_SIZE={args.image_size}: lower BATCH_SIZE (--batch-size) or IMAGE_SIZE "
                 f"(--image-size), or pick a lighter ENCODER")
    except OSError as exc:
        sys.exit(f"error: {exc}")


def run(args):
    """The story of a run: settings, data, model, the epochs, a summary."""
    check_settings(args)
    setup_processes(args)
    paths = output_paths(args)
    check_writable(paths["best"].parent)
    if args.encoder_weights == "imagenet" and not args.resume:
        model_lib.check_hub(args.encoder)  # offline: one line now, not after the data scan
    found, splits, split_file = load_splits(args, paths["data_report"])
    if args.lr_drop_epoch >= args.epochs:
        print(f"note: LR_DROP_EPOCH={args.lr_drop_epoch} is not before the last epoch "
              f"({args.epochs}): the learning rate stays {args.lr:g}")
    device, mixed, channels_last = setup_device(args)
    model, optimizer, scaler, progress = start_training(args, paths, device, mixed)
    earlier = [p.name for key, p in paths.items() if key != "data_report" and p.exists()]
    if earlier and progress["start"] == 1 and main_process():
        print(f"note: this new run replaces the earlier one in {paths['best'].parent} "
              f"({', '.join(earlier)})" + ("" if args.resume else
                                            "; --resume would continue it instead"))
    if progress["start"] > args.epochs:
        print(f"nothing to do: the run already finished its {args.epochs} epochs "
              f"(best model: {paths['best']})")
        return 0
    if main_process():
        warn_if_disk_low(paths["best"].parent, model)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if world_size() > 1:
        if SYNC_BATCHNORM:  # the same Parameter objects: the optimiser still holds them
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    settings = {"encoder": args.encoder, "encoder_depth": args.encoder_depth,
                "image_size": args.image_size, "interpolation": preprocess.INTERPOLATION,
                "mean": args.mean, "std": args.std, "threshold": args.threshold,
                "demo": args.demo, "data": args.data, "split_file": split_file,
                "fold": args.fold, "folds": args.folds, "seed": args.seed,
                "recipe": recipe(args)}
    loaders = make_loaders(splits, args, device)
    run_epochs(model, optimizer, scaler, loaders, progress, settings, paths, args, device,
               (mixed, channels_last))
    print(f"best valid IoU {progress['best_iou']:.4f} (per image, at original size); model: "
          f"{paths['best']}; log: {paths['log']}; curves: {paths['curves']}")
    if found.corrected or found.skipped or progress.get("unread"):
        print(f"data: {len(found.skipped)} file(s) skipped and {len(found.corrected)} corrected "
              f"at the scan (listed in {paths['data_report']})"
              + (f"; {progress['unread']} image read(s) failed during training (see the "
                 f"warnings)" if progress.get("unread") else ""))
    return 0


def run_epochs(model, optimizer, scaler, loaders, progress, settings, paths, args, device, amp):
    """Train, validate, record and save, epoch after epoch; Ctrl-C says what is saved."""
    train_loader, valid_loader = loaders
    loss_fn = model_lib.make_loss(args.loss)
    title = f"FPN {args.encoder}" + (" (DEMO data)" if args.demo else "") + f", {args.data}"
    print(f"{'epoch':>5} {'lr':>8} {'train_loss':>10} {'valid_loss':>10} {'valid_iou':>9} "
          f"{'valid_dice':>10} {'valid_tj':>8} {'seconds':>7}")  # tj: thresholded Jaccard
    epoch, saved_epoch = progress["start"], progress["start"] - 1
    try:
        for epoch in range(progress["start"], args.epochs + 1):
            t0 = time.time()
            lr = lr_for_epoch(epoch, args.lr, args.lr_drop_epoch, args.lr_after_drop)
            set_lr(optimizer, lr)
            # dropout: each epoch's (and process's) draws depend on these alone
            torch.manual_seed(args.seed + epoch + 1_000_003 * rank())
            for loader in (train_loader, valid_loader):
                loader.sampler.set_epoch(epoch)
            seen = {}
            train_loss = train_one_epoch(model, train_loader, loss_fn, optimizer, device, epoch,
                                         progress["iter_log"], scaler, *amp, args.threshold,
                                         progress=not args.quiet, stats=seen)
            valid = validate(model, valid_loader, loss_fn, device, args.threshold, *amp,
                             threads=max(1, args.workers))
            check_epoch_finite(valid, model, epoch)
            record_epoch(epoch, lr, train_loss, valid, time.time() - t0, model, optimizer, scaler,
                         progress, settings, paths, args, title)
            saved_epoch = epoch
            expected = world_size() * (len(train_loader) * args.batch_size
                                       if train_loader.drop_last else len(train_loader.sampler))
            missing = (expected - seen["images"] - seen["skipped"],
                       len(valid_loader.dataset) - valid["images"])
            if seen["skipped"]:
                print(f"warning: epoch {epoch}: {seen['skipped']} training image(s) were read "
                      f"but skipped, with a batch that came back empty in another process",
                      flush=True)
            if any(missing):
                progress["unread"] = progress.get("unread", 0) + sum(missing)
                print(f"warning: epoch {epoch}: {missing[0]} training and {missing[1]} "
                      f"validation image(s) could not be read and were left out (the warnings "
                      f"name the files)", flush=True)
    except KeyboardInterrupt:
        raise Interrupted(
            f"in epoch {epoch}; the resume state {paths['last']} holds epoch {saved_epoch}: "
            f"continue with --resume" if saved_epoch else
            f"in epoch {epoch}, before any epoch finished: nothing was saved") from None


def record_epoch(epoch, lr, train_loss, valid, seconds, model, optimizer, scaler, progress,
                 settings, paths, args, title):
    """The CSV row, the best checkpoint (when improved), the resume state, the curves."""
    row = {"epoch": epoch, "lr": lr, "train_loss": round(train_loss, 6),
           "valid_loss": round(valid["loss"], 6), "valid_iou": round(valid["iou"], 6),
           "valid_dice": round(valid["dice"], 6),
           "valid_threshold_jaccard": round(valid["threshold_jaccard"], 6),
           "seconds": round(seconds, 1)}
    progress["rows"].append(row)
    # a NaN IoU (no validation image readable) compares False: never the best
    improved = math.isfinite(valid["iou"]) and valid["iou"] > progress["best_iou"]
    if improved:
        progress["best_iou"] = valid["iou"]
    if not main_process():  # the same numbers everywhere; one process writes them
        return
    if improved:
        model_lib.save_checkpoint(model_lib.checkpoint_record(model, settings, epoch,
                                                              valid["iou"]), paths["best"])
    model_lib.save_checkpoint(resume_state(model, settings, epoch, valid["iou"], optimizer,
                                           scaler, progress, args), paths["last"])
    write_log(progress["rows"], paths["log"])
    plot_curves(progress["rows"], progress["iter_log"], paths["curves"], title)
    print(f"{epoch:>5} {lr:>8.0e} {train_loss:>10.4f} {valid['loss']:>10.4f} "
          f"{valid['iou']:>9.4f} {valid['dice']:>10.4f} {valid['threshold_jaccard']:>8.4f} "
          f"{row['seconds']:>7.1f}"
          + ("  *best" if improved else ""), flush=True)


if __name__ == "__main__":
    sys.exit(main())
