"""Train the FPN of "Semantic Segmentation for Skin Melanoma Detection" on ISIC images.

    python train_model.py                 # the paper's settings, data in data/
    python train_model.py --demo          # a few minutes on a laptop CPU, generated data
    python train_model.py --resume        # continue a stopped run on the same schedule

Edit the constants below for an experiment, or pass the matching flag.
"""
import argparse
import csv
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
BATCH_SIZE = 8                     # images per training step
EPOCHS = 40                        # the paper's 40 epochs
LR = 1e-4                          # Adam's learning rate for the first LR_DROP_EPOCH epochs
LR_DROP_EPOCH = 25                 # epochs 1..25 run at LR, epochs 26.. at LR_AFTER_DROP
LR_AFTER_DROP = 1e-5               # the rate after the drop
THRESHOLD = 0.5                    # probability at or above which a pixel is lesion
SEED = 42                          # one seed for the split, the model's start and the shuffling
WORKERS = min(8, max(1, (os.cpu_count() or 1) - 1))  # loader processes; one core left to the model
DEVICE = "auto"                    # "auto" (CUDA when present), "cuda" or "cpu"
VALID_FRACTION = 0.1               # share of training pairs drawn for validation (no official one)
TEST_FRACTION = 0.1                # share drawn for test (no official test masks)
CACHE = True                       # decode and resize each image once, then read the small copy
MIXED_PRECISION = True             # bfloat16 (or float16) autocast, on CUDA only
CHANNELS_LAST = True               # channels_last memory format, on CUDA only
CUDNN_BENCHMARK = True             # let cuDNN pick the fastest kernels for the fixed input size

# --demo: sized for a 2-core CPU in a few minutes; outputs under names no one mistakes for ISIC
DEMO = dict(data="data/demo", model_dir="Model/demo", encoder="resnet18", encoder_weights=None,
            image_size=(128, 128), batch_size=8, epochs=12, lr=1e-3, lr_drop_epoch=9,
            lr_after_drop=1e-4)
# ---------------------------------------------------------------------------------------

import numpy as np  # noqa: E402  (the settings above come first, as a reader looks for them)
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm import tqdm  # noqa: E402

import load_dataset  # noqa: E402
import metrics  # noqa: E402
import preprocess  # noqa: E402

CHECKPOINT_FORMAT = "melanoma-fpn-checkpoint"
CHECKPOINT_VERSION = 1
LISTED_FILES = 20  # corrected/skipped files named on the console; the data report lists all
CHECKPOINT_COPIES = 7  # model sizes on disk at the worst moment: best + last (3x, with Adam's
                       # two moments) + the temporary copy of the last being written


class SettingError(ValueError):
    """A setting that cannot work; the message names the constant."""


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint of this project; the message says why."""


class NonFiniteLoss(RuntimeError):
    """The loss or the model became NaN or infinite; the message names the epoch and step."""


class Interrupted(Exception):
    """Ctrl-C during training; the message says which epoch the resume state holds."""


# ----------------------------------------------------------------------------- model

def check_encoder(encoder):
    import segmentation_models_pytorch as smp

    if encoder in smp.encoders.get_encoder_names():
        return
    if encoder.startswith("tu-"):
        import timm
        if timm.is_model(encoder[3:]):
            return
    raise SettingError(f"ENCODER {encoder!r} is not an encoder of segmentation-models-pytorch "
                       f"(for example resnet18, resnet34, se_resnext50_32x4d, efficientnet-b3)")


def build_model(encoder=ENCODER, encoder_weights=None, depth=ENCODER_DEPTH):
    """smp.FPN with one output class (logits). `encoder_weights`: "imagenet", None or a path."""
    import segmentation_models_pytorch as smp

    check_encoder(encoder)
    hub = encoder_weights == "imagenet"
    try:
        model = smp.FPN(encoder_name=encoder, encoder_weights="imagenet" if hub else None,
                        encoder_depth=depth, classes=1,
                        # smp's decoder output stride shrinks with the depth: this factor
                        # brings the mask back to the input size at depths 3, 4 and 5
                        upsampling=2 ** (depth - 3))
    except (OSError, ConnectionError, RuntimeError) as exc:
        if not hub:
            raise
        raise SettingError(
            f"ENCODER_WEIGHTS='imagenet': the download of the {encoder} weights failed "
            f"({exc.__class__.__name__}). Offline, pass --encoder-weights PATH with a local "
            f"weights file for this encoder, or --encoder-weights none to train from scratch."
        ) from None
    if encoder_weights not in (None, "imagenet"):
        load_encoder_weights(model, encoder_weights)
    return model


def load_encoder_weights(model, path):
    """Load a local file of encoder weights (for machines with no internet)."""
    path = Path(path)
    if not path.is_file():
        raise SettingError(f"ENCODER_WEIGHTS: no weights file at {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SettingError(f"ENCODER_WEIGHTS: {path} is not a readable weights file "
                           f"({exc.__class__.__name__}: {str(exc).splitlines()[0][:120]})") from None
    for key in ("state_dict", "model_state", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = {k.removeprefix("module.").removeprefix("encoder."): v for k, v in state.items()
             if torch.is_tensor(v)}
    missing, unexpected = model.encoder.load_state_dict(state, strict=False)
    heads = ("fc.", "last_linear.", "classifier.", "head.")
    unexpected = [k for k in unexpected if not k.startswith(heads)]
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise SettingError(f"ENCODER_WEIGHTS: {path} does not fit the encoder: {len(missing)} "
                           f"weights missing, {len(unexpected)} unexpected (e.g. {example!r})")


# ----------------------------------------------------------------------------- checkpoints

def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written file.

    A kill leaves at most a stale `<name>.tmp` beside the intact previous file; the next save
    overwrites it and nothing ever reads it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except OSError as exc:  # a full disk, a removed folder: say where, keep the old file
        tmp.unlink(missing_ok=True)
        kept = f"; the previous {path.name} is unchanged" if path.exists() else ""
        raise OSError(f"could not write {path}: {exc.strerror or exc}{kept}") from None
    except BaseException:  # Ctrl-C mid-write: no half file left behind
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder):
    """Make a rename survive a power cut; not every system can open a folder, which is fine."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def model_record(model, settings, epoch, valid_iou):
    """The best-model checkpoint: tensors and plain values, everything inference needs."""
    return {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
        "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "encoder": settings["encoder"], "encoder_depth": settings["encoder_depth"],
        "image_size": list(settings["image_size"]), "threshold": settings["threshold"],
        "mean": list(preprocess.IMAGENET_MEAN), "std": list(preprocess.IMAGENET_STD),
        "epoch": epoch, "valid_iou": valid_iou, "demo": settings["demo"],
        "data_dir": str(Path(settings["data"]).resolve()), "split_file": str(settings["split_file"]),
    }


# what a file that torch.save did not write usually is, by its first bytes
OTHER_FORMATS = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8", "a JPEG image"),
                 (b"{", "JSON text"), (b"\x93NUMPY", "a NumPy array"),
                 (b"\x89HDF", "an HDF5 (Keras) file"))


def load_checkpoint(path):
    """Read a checkpoint with weights_only=True (loading never runs code); clear errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    # torch.save writes a zip archive (PK); files of torch < 1.6 start with a pickle (0x80)
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        kind = next((name for magic, name in OTHER_FORMATS if head.startswith(magic)),
                    "empty" if not head else f"a file starting with {head!r}")
        raise CheckpointError(f"{path} is not a readable checkpoint: it is {kind}, not a file "
                              f"written by torch.save")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        if "Unsupported global" in text or "Unsupported class" in text:
            raise CheckpointError(
                f"{path} holds pickled Python objects (for example a whole model saved with "
                f"torch.save(model)); loading it could run arbitrary code, so it is refused. "
                f"Use a checkpoint written by train_model.py.") from None
        # the cause, without torch's advice on weights_only=False, which would run code
        cause = text.split("WeightsUnpickler error:")[-1].strip() or repr(exc)
        cause = cause.splitlines()[0].split(". ")[0][:120]
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or damaged: "
                              f"{cause})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} was not written by train_model.py (no "
                              f"'{CHECKPOINT_FORMAT}' marker)")
    if not isinstance(ckpt.get("version"), int) or ckpt["version"] > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {ckpt.get('version')!r}; this "
                              f"train_model.py reads version {CHECKPOINT_VERSION} or older")
    return ckpt


def model_from_checkpoint(ckpt, path="checkpoint"):
    """Rebuild the FPN a checkpoint describes and load its weights."""
    try:
        model = build_model(ckpt["encoder"], None, ckpt["encoder_depth"])
        model.load_state_dict(ckpt["model_state"])
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as exc:
        # SettingError (an unknown recorded encoder) is a ValueError
        raise CheckpointError(f"{path} does not fit its recorded model "
                              f"(encoder {ckpt.get('encoder')!r}): "
                              f"{str(exc).splitlines()[0][:160]}") from None
    return model


# ----------------------------------------------------------------------------- schedule

def lr_for_epoch(epoch, lr=LR, drop_epoch=LR_DROP_EPOCH, lr_after=LR_AFTER_DROP):
    """Learning rate of a 1-based epoch: LR through epoch `drop_epoch`, then LR_AFTER_DROP.

    A rule on the epoch number, so a resumed run lands on the same schedule."""
    return lr if epoch <= drop_epoch else lr_after


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:  # every group, not only the decoder's
        group["lr"] = lr


# ----------------------------------------------------------------------------- loops

def make_loss():
    """The paper's Dice loss on logits (a function, so a test can plant a faulty one)."""
    import segmentation_models_pytorch as smp
    return smp.losses.DiceLoss("binary", from_logits=True)


def _autocast(device, mixed):
    if device.type == "cuda" and mixed:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, enabled=False)


def _to_device(images, masks, device, channels_last):
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, masks.to(device, non_blocking=True)


def train_one_epoch(model, loader, loss_fn, optimizer, device, epoch, iter_log, scaler=None,
                    mixed=False, channels_last=False, threshold=THRESHOLD, progress=True,
                    stats=None):
    """One pass over the training loader; returns the mean Dice loss.

    `iter_log` receives (loss, mean IoU of the batch) per step: the paper's Figures 8 and 9.
    `stats`, when a dict, receives "images": how many were trained on (fewer than the loader
    holds when files became unreadable during the run)."""
    model.train()
    total, seen = 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not progress)
    for step, batch in enumerate(bar, 1):
        if batch is None:  # every file of the batch became unreadable
            continue
        images, masks, _ = batch
        images, masks = _to_device(images, masks, device, channels_last)
        with _autocast(device, mixed):
            logits = model(images)
        loss = loss_fn(logits.float(), masks)  # Dice in float32: float16 sums overflow
        loss_value = loss.item()  # one device sync per step, reused below
        if not math.isfinite(loss_value):
            # before the optimiser step: the weights and every checkpoint stay as they were
            raise NonFiniteLoss(f"the training loss became {loss_value} at epoch {epoch}, "
                                f"step {step}; stopped before updating the model (the best "
                                f"checkpoint is untouched). Lower LR, or turn MIXED_PRECISION "
                                f"off.")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            counts = metrics.batch_confusion(torch.sigmoid(logits.float()), masks, threshold)
            batch_iou = metrics.mean_scores(counts.tolist())["iou"]
        n = images.shape[0]
        total += loss_value * n
        seen += n
        iter_log.append((loss_value, batch_iou))
        bar.set_postfix(loss=f"{total / seen:.4f}")
    if stats is not None:
        stats["images"] = seen
    return total / max(seen, 1)


def weights_finite(model):
    """True when no weight or batch-norm statistic is NaN or infinite."""
    return all(torch.isfinite(t).all() for t in model.state_dict().values()
               if t.is_floating_point())


@torch.inference_mode()
def evaluate(model, loader, loss_fn, device, threshold=THRESHOLD, mixed=False,
             channels_last=False, progress=False):
    """Mean Dice loss and per-image mean scores (IoU, Dice, thresholded Jaccard, ...)."""
    model.eval()
    total, seen, counts = 0.0, 0, []
    for batch in tqdm(loader, desc="valid", leave=False, disable=not progress):
        if batch is None:
            continue
        images, masks, _ = batch
        images, masks = _to_device(images, masks, device, channels_last)
        with _autocast(device, mixed):
            logits = model(images)
        total += loss_fn(logits.float(), masks).item() * images.shape[0]
        seen += images.shape[0]
        counts += metrics.batch_confusion(torch.sigmoid(logits.float()), masks, threshold).tolist()
    result = metrics.mean_scores(counts)
    result["loss"] = total / max(seen, 1)
    return result


# ----------------------------------------------------------------------------- logs

LOG_COLUMNS = ["epoch", "lr", "train_loss", "valid_loss", "valid_iou", "valid_dice",
               "valid_threshold_jaccard", "seconds"]


def write_log(rows, path):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


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
        axes[0].set(title="training Dice loss per iteration", xlabel="iteration", ylabel="loss")
        axes[1].plot(steps, ious, lw=0.6, color="tab:green")
        axes[1].set(title="training IoU per iteration", xlabel="iteration", ylabel="IoU",
                    ylim=(0, 1))
    epochs = [r["epoch"] for r in rows]
    axes[2].plot(epochs, [r["train_loss"] for r in rows], "o-", label="train Dice loss")
    axes[2].plot(epochs, [r["valid_loss"] for r in rows], "o-", label="valid Dice loss")
    axes[2].plot(epochs, [r["valid_iou"] for r in rows], "s-", label="valid IoU")
    axes[2].plot(epochs, [r["valid_dice"] for r in rows], "s-", label="valid Dice")
    axes[2].set(title="per epoch", xlabel="epoch", ylim=(0, 1))
    axes[2].legend(loc="center right")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- main

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
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--lr-drop-epoch", type=int, default=LR_DROP_EPOCH)
    p.add_argument("--lr-after-drop", type=float, default=LR_AFTER_DROP)
    p.add_argument("--threshold", type=float, default=THRESHOLD)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--workers", type=int, default=WORKERS)
    p.add_argument("--device", default=DEVICE, choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-cache", dest="cache", action="store_false", default=CACHE,
                   help="decode every image every epoch (no preprocessed cache)")
    p.add_argument("--resume", action="store_true", help="continue from the saved state")
    p.add_argument("--redraw-split", action="store_true",
                   help="draw the train/valid/test split anew (after the data changed)")
    p.add_argument("--demo", action="store_true",
                   help="train on generated demo data with CPU-sized settings")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.demo:  # demo settings replace only what the user left at its default
        for key, value in DEMO.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    args.image_size = tuple(args.image_size)
    return args


def check_settings(args):
    """Refuse, in one line naming the constant, a setting that cannot work."""
    size_ok = preprocess.permitted_size(args.image_size, args.encoder_depth) \
        if 3 <= args.encoder_depth <= 5 else None
    if not 3 <= args.encoder_depth <= 5:
        raise SettingError(f"ENCODER_DEPTH={args.encoder_depth}: the FPN needs 3, 4 or 5")
    if size_ok != args.image_size:
        raise SettingError(f"IMAGE_SIZE={args.image_size} breaks the size rule: each side must "
                           f"be a multiple of 2**{args.encoder_depth} = {2 ** args.encoder_depth}"
                           f" (nearest: {size_ok})")
    check_encoder(args.encoder)
    if not 0.0 < args.threshold < 1.0:
        raise SettingError(f"THRESHOLD={args.threshold} must lie between 0 and 1")
    if args.epochs < 1:
        raise SettingError(f"EPOCHS={args.epochs} must be at least 1")
    if args.batch_size < 1:
        raise SettingError(f"BATCH_SIZE={args.batch_size} must be at least 1")
    for constant, value in (("LR", args.lr), ("LR_AFTER_DROP", args.lr_after_drop)):
        if not value > 0:  # NaN fails this too
            raise SettingError(f"{constant}={value} must be greater than 0")
    if args.workers < 0:
        raise SettingError(f"WORKERS={args.workers} must be 0 or more")


def pick_device(name):
    """torch.device for DEVICE ("auto", "cuda" or "cpu"); shared with test_model.py."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SettingError("DEVICE='cuda' but no CUDA device is available; use --device auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def check_writable(folder):
    """Fail before any training if the outputs cannot be written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write_test"
        probe.write_bytes(b"0" * 1024)
        probe.unlink()
    except OSError as exc:
        raise SettingError(f"MODEL_DIR={str(folder)!r} cannot be written: "
                           f"{exc.strerror or exc}") from None


def make_loaders(splits, args, device):
    cache = None
    if args.cache:
        cache = preprocess.PreprocessCache(load_dataset.work_dir(args.data) / ".cache",
                                           args.image_size, args.encoder_depth)
    train_set = load_dataset.SegmentationDataset(splits["train"], args.image_size, augment=True,
                                                 cache=cache, seed=args.seed)
    valid_set = load_dataset.SegmentationDataset(splits["valid"], args.image_size, cache=cache)
    common = dict(num_workers=args.workers, pin_memory=device.type == "cuda",
                  collate_fn=load_dataset.collate_skip_none,
                  persistent_workers=args.workers > 0,
                  worker_init_fn=load_dataset.seed_worker)
    generator = torch.Generator()
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                              drop_last=len(train_set) > args.batch_size, generator=generator,
                              **common)
    valid_loader = DataLoader(valid_set, batch_size=args.batch_size, shuffle=False, **common)
    return train_loader, valid_loader, generator


def output_paths(args):
    folder = Path(args.model_dir)
    stem = f"demo_{args.encoder}" if args.demo else args.encoder
    return {"best": folder / f"{stem}.pth", "last": folder / f"{stem}_last.pth",
            "log": folder / f"{stem}_log.csv", "curves": folder / f"{stem}_curves.png",
            "data_report": folder / f"{stem}_data.txt"}


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
    text = found.summary() + "\n" + "\n".join(
        f"Split {k}: {len(v)} pairs" for k, v in splits.items()) + "\n"
    tmp = report_path.with_name(report_path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, report_path)


def warn_if_disk_low(folder, model):
    """One line when the output disk may fill before the first checkpoints are written."""
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    needed = CHECKPOINT_COPIES * model_bytes
    free = shutil.disk_usage(folder).free
    if free < needed:
        print(f"warning: only {free / 2**20:.0f} MB free for {folder}; the checkpoints need "
              f"about {needed / 2**20:.0f} MB: free some space or pass another --model-dir")


RESUME_SETTINGS = (("encoder", "ENCODER", "--encoder"),
                   ("encoder_depth", "ENCODER_DEPTH", "--encoder-depth"),
                   ("image_size", "IMAGE_SIZE", "--image-size"))


def load_resume_state(path, args):
    """The saved state of an interrupted run, refused when it was made with other settings."""
    state = load_checkpoint(path)
    missing = [k for k in ("epoch", "best_iou", "optimizer_state", "history", "iter_log")
               if k not in state]
    if missing:
        raise CheckpointError(f"--resume: {path} is not a resume state (no {missing[0]!r}); "
                              f"delete it to start over")
    for key, constant, flag in RESUME_SETTINGS:
        saved, current = state.get(key), getattr(args, key)
        if key == "image_size":
            saved, current = tuple(saved or ()), tuple(current)
        if saved != current:
            raise SettingError(f"--resume: {path} was made with {constant}={saved!r}, not "
                               f"{current!r}: use {flag} as then, or another --model-dir for a "
                               f"new run")
    return state


def check_epoch_finite(valid, model, epoch):
    """Stop before saving anything when validation shows a broken (NaN or inf) model."""
    if valid["images"] and not (math.isfinite(valid["loss"]) and math.isfinite(valid["iou"])):
        raise NonFiniteLoss(f"the validation loss became {valid['loss']} (IoU {valid['iou']}) "
                            f"at epoch {epoch}; stopped before saving (the best checkpoint "
                            f"and the resume state keep the previous epoch). Lower LR.")
    if not weights_finite(model):
        raise NonFiniteLoss(f"the model's weights became NaN or infinite at epoch {epoch}; "
                            f"stopped before saving (the best checkpoint is untouched). "
                            f"Lower LR.")


def unread_line(epoch, train_missing, valid_missing):
    return (f"warning: epoch {epoch}: {train_missing} training and {valid_missing} validation "
            f"image(s) could not be read and were left out (the warnings name the files)")


# cuDNN and cuBLAS report a failed allocation as a plain RuntimeError with these words
GPU_OOM_WORDS = ("CUDA out of memory", "CUDA error: out of memory", "CUDNN_STATUS_ALLOC_FAILED",
                 "CUBLAS_STATUS_ALLOC_FAILED")


def gpu_out_of_memory(exc):
    return isinstance(exc, torch.cuda.OutOfMemoryError) or any(w in str(exc)
                                                              for w in GPU_OOM_WORDS)


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (SettingError, CheckpointError, load_dataset.SplitMismatch, NonFiniteLoss) as exc:
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
    check_settings(args)
    paths = output_paths(args)
    check_writable(paths["best"].parent)
    if args.demo and not any(Path(args.data).glob("*Training_Input*")):
        print(f"making demo data in {args.data} ...")
        load_dataset.make_demo(args.data)

    found = load_dataset.scan(args.data)
    if not any(found.splits.values()):
        raise SettingError(load_dataset.no_data_message(args.data))
    split_file = load_dataset.work_dir(args.data) / "split.json"
    if args.redraw_split:
        split_file.unlink(missing_ok=True)
    splits = load_dataset.split_pairs(found, seed=args.seed, valid_fraction=VALID_FRACTION,
                                      test_fraction=TEST_FRACTION, split_file=split_file)
    report_data(found, splits, args, paths["data_report"])
    if args.batch_size > len(splits["train"]):
        raise SettingError(f"BATCH_SIZE={args.batch_size} is larger than the training split "
                           f"({len(splits['train'])} images)")
    if not splits["valid"]:
        raise SettingError("the validation split is empty: add data or raise VALID_FRACTION")
    if args.lr_drop_epoch >= args.epochs:
        print(f"note: LR_DROP_EPOCH={args.lr_drop_epoch} is not before the last epoch "
              f"({args.epochs}): the learning rate stays {args.lr:g}")

    device = pick_device(args.device)
    if device.type == "cpu":
        print("device: CPU (no CUDA device in use; training is far slower than on a GPU)")
    else:
        print(f"device: {torch.cuda.get_device_name()}")
    cuda = device.type == "cuda"
    mixed, channels_last = MIXED_PRECISION and cuda, CHANNELS_LAST and cuda
    torch.backends.cudnn.benchmark = CUDNN_BENCHMARK and cuda
    settings = {"encoder": args.encoder, "encoder_depth": args.encoder_depth,
                "image_size": args.image_size, "threshold": args.threshold, "demo": args.demo,
                "data": args.data, "split_file": split_file}

    state = None
    if args.resume and paths["last"].is_file():
        state = load_resume_state(paths["last"], args)
    elif args.resume:
        print(f"no saved state at {paths['last']}: starting from the beginning")
    start, best_iou, rows, iter_log = 1, -1.0, [], []
    torch.manual_seed(args.seed)
    if state is None:
        model = build_model(args.encoder, args.encoder_weights, args.encoder_depth)
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    else:
        model = model_from_checkpoint(state, paths["last"])
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        optimizer.load_state_dict(state["optimizer_state"])
        start, best_iou = state["epoch"] + 1, state["best_iou"]
        rows, iter_log = state["history"], [tuple(x) for x in state["iter_log"]]
        print(f"resuming after epoch {state['epoch']} (best valid IoU {best_iou:.4f})")
        if start > args.epochs:
            print(f"nothing to do: the run already finished its {args.epochs} epochs "
                  f"(best model: {paths['best']})")
            return 0
    warn_if_disk_low(paths["best"].parent, model)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler("cuda") if mixed and not torch.cuda.is_bf16_supported() else None

    loss_fn = make_loss()
    train_loader, valid_loader, generator = make_loaders(splits, args, device)
    # images an epoch should see: a file unreadable since the scan makes it see fewer
    train_expected = len(train_loader) * args.batch_size if train_loader.drop_last \
        else len(train_loader.dataset)
    title = f"FPN {args.encoder}" + (" (DEMO data)" if args.demo else "") + f", {args.data}"

    print(f"{'epoch':>5} {'lr':>8} {'train_loss':>10} {'valid_loss':>10} {'valid_iou':>9} "
          f"{'valid_dice':>10} {'seconds':>7}")
    epoch, saved_epoch, unread = start, start - 1, 0
    try:
        for epoch in range(start, args.epochs + 1):
            t0 = time.time()
            lr = lr_for_epoch(epoch, args.lr, args.lr_drop_epoch, args.lr_after_drop)
            set_lr(optimizer, lr)
            torch.manual_seed(args.seed + epoch)  # each epoch's randomness depends on it alone
            generator.manual_seed(args.seed + epoch)
            train_loader.dataset.set_epoch_seed(args.seed + epoch)
            seen = {}
            train_loss = train_one_epoch(model, train_loader, loss_fn, optimizer, device, epoch,
                                         iter_log, scaler, mixed, channels_last, args.threshold,
                                         progress=not args.quiet, stats=seen)
            valid = evaluate(model, valid_loader, loss_fn, device, args.threshold, mixed,
                             channels_last)
            check_epoch_finite(valid, model, epoch)
            row = {"epoch": epoch, "lr": lr, "train_loss": round(train_loss, 6),
                   "valid_loss": round(valid["loss"], 6), "valid_iou": round(valid["iou"], 6),
                   "valid_dice": round(valid["dice"], 6),
                   "valid_threshold_jaccard": round(valid["threshold_jaccard"], 6),
                   "seconds": round(time.time() - t0, 1)}
            rows.append(row)
            # a NaN IoU (no validation image readable) compares False: never the best
            improved = math.isfinite(valid["iou"]) and valid["iou"] > best_iou
            if improved:
                best_iou = valid["iou"]
                save_atomic(model_record(model, settings, epoch, best_iou), paths["best"])
            state = model_record(model, settings, epoch, valid["iou"])
            state.update(optimizer_state=optimizer.state_dict(), best_iou=best_iou,
                         history=rows, iter_log=[list(x) for x in iter_log], seed=args.seed,
                         epochs=args.epochs)
            save_atomic(state, paths["last"])
            saved_epoch = epoch
            write_log(rows, paths["log"])
            plot_curves(rows, iter_log, paths["curves"], title)
            print(f"{epoch:>5} {lr:>8.0e} {train_loss:>10.4f} {valid['loss']:>10.4f} "
                  f"{valid['iou']:>9.4f} {valid['dice']:>10.4f} {row['seconds']:>7.1f}"
                  + ("  *best" if improved else ""), flush=True)
            missing = (train_expected - seen["images"], len(valid_loader.dataset) - valid["images"])
            if any(missing):
                unread += sum(missing)
                print(unread_line(epoch, *missing), flush=True)
    except KeyboardInterrupt:
        raise Interrupted(
            f"in epoch {epoch}; the resume state {paths['last']} holds epoch {saved_epoch}: "
            f"continue with --resume" if saved_epoch else
            f"in epoch {epoch}, before any epoch finished: nothing was saved") from None

    print(f"best valid IoU {best_iou:.4f}; model: {paths['best']}; log: {paths['log']}; "
          f"curves: {paths['curves']}")
    if found.corrected or found.skipped or unread:
        print(f"data: {len(found.skipped)} file(s) skipped and {len(found.corrected)} corrected "
              f"at the scan (listed in {paths['data_report']})"
              + (f"; {unread} image read(s) failed during training (see the warnings)"
                 if unread else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
