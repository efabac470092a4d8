"""The checkpoint format and the names of a run's files.

A checkpoint is a plain dict of tensors and plain values, read with weights_only=True:

    format, version       CHECKPOINT_FORMAT, CHECKPOINT_VERSION (another version is refused)
    model_state           the network's weights
    settings              the one record of how the run was made: every recorded setting of
                          train_model.py (ARCH, ENCODER, IMAGE_SIZE, MEAN, STD, THRESHOLD, LR,
                          ...) by its flag's name, plus data, fold, demo and interpolation
    epoch, valid_iou      the epoch it holds and its validation IoU
    split_file, data_digest, split_digest   which images: the split, all pairs, train+valid
    confidence            (optional) the level stored by test_model.py --calibrate

A resume state (`<run>_last.pth`) adds optimizer_state, scaler_state, best_iou, history,
iter_log, unread and processes.
"""
import hashlib
import math
import re
from pathlib import Path

import torch

import preprocess
from model import build_model

CHECKPOINT_FORMAT = "melanoma-fpn-checkpoint"
CHECKPOINT_VERSION = 2


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint of this project; the message says why."""


def make_checkpoint(model, run, epoch, valid_iou):
    """The best-model checkpoint of a run. `run`: {"settings": {...}, "split_file": ...,
    "data_digest": ..., "split_digest": ...}, as train_model.run_record makes it."""
    return {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
        "model_state": {k.removeprefix("module."): v.detach().cpu()
                        for k, v in model.state_dict().items()},
        "settings": dict(run["settings"]),
        "epoch": epoch,
        "valid_iou": None if valid_iou is None or math.isnan(valid_iou) else valid_iou,
        "split_file": str(run.get("split_file") or ""),
        "data_digest": run.get("data_digest"), "split_digest": run.get("split_digest"),
    }


def input_settings(ckpt):
    """The preprocessing a checkpoint was trained with: inference reads it from here, never
    from a constant training may have changed since."""
    s = ckpt["settings"]
    return preprocess.InputSettings(tuple(s["image_size"]), s["interpolation"],
                                    tuple(s["mean"]), tuple(s["std"]))


def save_checkpoint(obj, path):
    """torch.save through preprocess.atomic_write: a crash never leaves a half-written file."""
    with preprocess.atomic_write(path, durable=True) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


# what a file that torch.save did not write usually is, by its first bytes
OTHER_FORMATS = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8", "a JPEG image"),
                 (b"{", "JSON text"), (b"\x93NUMPY", "a NumPy array"),
                 (b"\x89HDF", "an HDF5 (Keras) file"))


def load_checkpoint(path):
    """Read a checkpoint with weights_only=True (loading never runs code); clear errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: check the path, or train one with "
                              f"`python train_model.py` (`--demo` for a quick one)")
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
        raise CheckpointError(_load_failure(path, exc)) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} was not written by train_model.py (no "
                              f"'{CHECKPOINT_FORMAT}' marker)")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {ckpt.get('version')!r}; this "
                              f"code reads version {CHECKPOINT_VERSION} only: train the model "
                              f"again, or use the release of the project that wrote it")
    return ckpt


def _load_failure(path, exc):
    text = str(exc)
    if "Unsupported global" in text or "Unsupported class" in text:
        return (f"{path} holds pickled Python objects (for example a whole model saved with "
                f"torch.save(model)); loading it could run arbitrary code, so it is refused. "
                f"Use a checkpoint written by train_model.py.")
    # the cause, without torch's advice on weights_only=False, which would run code
    cause = text.split("WeightsUnpickler error:")[-1].strip() or repr(exc)
    cause = cause.splitlines()[0].split(". ")[0][:120]
    return f"{path} is not a readable checkpoint (truncated or damaged: {cause})"


def model_from_checkpoint(ckpt, path="checkpoint"):
    """Rebuild the network a checkpoint's settings describe and load its weights."""
    s = ckpt["settings"]
    try:
        model = build_model(s["encoder"], None, s["encoder_depth"], s["arch"])
        model.load_state_dict(ckpt["model_state"])
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as exc:
        # SettingError (an unknown recorded encoder or ARCH) is a ValueError
        raise CheckpointError(f"{path} does not fit its recorded model "
                              f"({s.get('arch')} {s.get('encoder')!r}): "
                              f"{str(exc).splitlines()[0][:160]}") from None
    return model


# what train_model.py writes per run, by role: <stem><suffix> in the model folder
RUN_FILES = {"best": ".pth", "last": "_last.pth", "log": "_log.csv", "curves": "_curves.png",
             "data_report": "_data.txt"}


# <arch>_<encoder>, lower case: two architectures on one encoder never share a file
RUN_STEM = re.compile(r"^(?P<demo>demo_)?(?P<arch>[a-z0-9]+)_(?P<encoder>.+?)"
                      r"(?:_fold(?P<fold>\d+))?$")


def run_stem(arch, encoder, fold=None, demo=False):
    """The name a run's files share: fpn_resnet18, demo_fpn_resnet18, unet_resnet18_fold3."""
    return (("demo_" if demo else "") + f"{arch.lower()}_{encoder}"
            + ("" if fold is None else f"_fold{fold}"))


def run_files(model_dir, stem):
    """{role: path} of the files of the run named `stem` in model_dir."""
    return {role: Path(model_dir) / f"{stem}{suffix}" for role, suffix in RUN_FILES.items()}


def stem_of(path):
    """The run name of one of its files (a best model, a resume state, a log...)."""
    name = Path(path).name
    for suffix in sorted(RUN_FILES.values(), key=len, reverse=True):
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return Path(path).stem


def fold_of(path):
    """The fold of a run's file, from its name (None: not a fold model)."""
    name = RUN_STEM.match(stem_of(path))
    return None if name is None or name["fold"] is None else int(name["fold"])


def is_resume_state(path):
    return Path(path).name.endswith(RUN_FILES["last"])


def best_models(folder):
    """The best-model checkpoints in a folder, by name (resume states left out)."""
    return sorted(p for p in Path(folder).glob("*.pth") if not is_resume_state(p))


def resume_states(folder):
    return sorted(Path(folder).glob(f"*{RUN_FILES['last']}"))


def results_name(paths):
    """The folder name that keeps one model's (or one ensemble's) results apart from another's:
    the run name of one checkpoint (with _last for a resume state), or ensemble_<N>_<digest>."""
    paths = [Path(p) for p in paths]
    if len(paths) == 1:
        return paths[0].stem
    digest = hashlib.sha1("|".join(sorted(str(p.resolve()) for p in paths)).encode())
    return f"ensemble_{len(paths)}_{digest.hexdigest()[:8]}"


def checkpoint_fields(path, keys):
    """A few plain fields of a checkpoint (its settings, epoch, digests), read without loading
    its tensors into memory; {} for a file of another format or version."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # an unreadable file is reported where it is loaded for real
        return {}
    if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION:
        return {}
    fields = {**ckpt["settings"], **{k: v for k, v in ckpt.items() if k != "settings"}}
    return {k: fields.get(k) for k in keys}
