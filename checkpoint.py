"""The checkpoint format and the names of a run's files.

A checkpoint is a plain dict of tensors and plain values, read with weights_only=True:

    format, version       CHECKPOINT_FORMAT, CHECKPOINT_VERSION: the version marks a change of
                          this layout only (a new setting is no change: see below)
    model_state           the network's weights (with EMA_DECAY: the weight average, which
                          is what the run validated)
    settings              the one record of how the run was made: every recorded setting of
                          train_model.py (ARCH, ENCODER, IMAGE_SIZE, MEAN, STD, THRESHOLD, LR,
                          ...) by its flag's name, plus data, fold, demo and interpolation
    epoch, valid_iou      the epoch it holds and its validation IoU
    split_file, data_digest, split_digest   which images: the split, all pairs, train+valid
    confidence            (optional) the level stored by test_model.py --calibrate

A resume state (`<run>_last.pth`) adds optimizer_state, scaler_state, best_iou, history,
iter_log, unread and processes; with EMA_DECAY also trained_model_state (the weights the
optimiser steps) and average_updates (the average's count of updates). Optional keys are a
format's growth too, not a new version: a reader asks for them with .get.

Every file the project has written since version 2 stays readable: `load_checkpoint` (and
`checkpoint_fields`) pass it through `migrate`, one step per later version (MIGRATIONS). A
setting that a record predates takes the value that record stands for, the `older` of its
row in train_model.py's SETTINGS, named once on the console: inference reads each setting
through `setting`, a resume fills them all (`with_older_settings`). A version newer than the
code is refused with its number and the advice to update.
"""
import hashlib
import math
import re
import shutil
from pathlib import Path

import torch

import preprocess
import settings as settings_lib
import model as model_lib
from model import build_model

CHECKPOINT_FORMAT = "melanoma-fpn-checkpoint"
CHECKPOINT_VERSION = 2
OLDEST_VERSION = 2  # the first version whose files the project promises to read
# MIGRATIONS[v]: turns the dict of a version-v checkpoint into version v + 1 (the step sets
# nothing else than its own change; migrate sets the version). A format change is
# CHECKPOINT_VERSION + 1 and one step here; the files of tests/fixtures/checkpoint_v2 keep
# every step tested.
MIGRATIONS = {}
TRAIN_SCRIPT = Path(__file__).with_name("train_model.py")  # its SETTINGS hold `older`


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint of this project; the message says why."""


def make_checkpoint(model, run, epoch, valid_iou):
    """The best-model checkpoint of a run. `run`: {"settings": {...}, "split_file": ...,
    "data_digest": ..., "split_digest": ...}, the record train_model.run makes."""
    return {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
        "model_state": model_lib.without_deep_supervision(
            {k.removeprefix("module."): v.detach().cpu() for k, v in model.state_dict().items()}),
        "settings": dict(run["settings"]),
        "epoch": epoch,
        "valid_iou": None if valid_iou is None or math.isnan(valid_iou) else valid_iou,
        "split_file": str(run.get("split_file") or ""),
        "data_digest": run.get("data_digest"), "split_digest": run.get("split_digest"),
    }


def input_settings(ckpt):
    """The preprocessing a checkpoint was trained with: inference reads it from here, never
    from a constant training may have changed since."""
    size, interpolation, mean, std = (setting(ckpt, k) for k in ("image_size", "interpolation",
                                                                  "mean", "std"))
    return preprocess.InputSettings(tuple(size), interpolation, tuple(mean), tuple(std))


class SaveError(OSError):
    """A checkpoint that could not be written (a full disk...): one line says where, how many
    bytes it needs and how many are free; the previous file of that name is unchanged."""


def save_checkpoint(obj, path):
    """torch.save through preprocess.atomic_write: a crash or a full disk never leaves a
    half-written file, and the previous one stays; a failure is a SaveError."""
    path = Path(path)
    try:
        with preprocess.atomic_write(path, durable=True) as tmp, open(tmp, "wb") as f:
            torch.save(obj, f)
    except (OSError, RuntimeError) as exc:  # torch reports a failed write as a RuntimeError
        cause = exc if isinstance(exc, OSError) else exc.__cause__ or exc.__context__
        if not isinstance(cause, OSError) and "inline_container" not in str(exc):
            raise
        raise SaveError(save_failure(obj, path, cause or exc)) from None


def save_failure(obj, path, exc):
    free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else 0
    why = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
    why = why.split(";")[0].split(": ")[-1][:120]  # preprocess.atomic_write names the file
    kept = f"; the previous {path.name} is unchanged" if path.exists() else ""
    return (f"could not save {path.name} in {path.parent} ({why}): it needs about "
            f"{stored_bytes(obj):,} bytes, {free:,} bytes are free there{kept}")


def stored_bytes(obj):
    """About the bytes torch.save writes for `obj`: its tensors' (the rest is small)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(stored_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(stored_bytes(v) for v in obj)
    return 0


# what a file that torch.save did not write usually is, by its first bytes
OTHER_FORMATS = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8", "a JPEG image"),
                 (b"{", "JSON text"), (b"\x93NUMPY", "a NumPy array"),
                 (b"\x89HDF", "an HDF5 (Keras) file"))


def load_checkpoint(path, older=None):
    """Read a checkpoint with weights_only=True (loading never runs code), migrated to this
    version, settings it predates filled in (`with_older_settings`); clear errors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: check the path, or train one with "
                              f"`python train_model.py` (`--demo` for a quick one)")
    with open(path, "rb") as f:
        head = f.read(8)
    if not head.startswith(b"PK\x03\x04"):  # torch.save writes a zip archive
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
    return with_older_settings(migrate(ckpt, path), path, older)


def migrate(ckpt, path="checkpoint"):
    """The checkpoint in this code's version: each MIGRATIONS step from its own version on.
    A newer version is refused (update the code); so is one older than OLDEST_VERSION."""
    version = ckpt.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path} has no checkpoint version ({version!r}): it is damaged "
                              f"or was not written by train_model.py")
    if version > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {version}, newer than this code "
                              f"reads (up to {CHECKPOINT_VERSION}): update the project (git "
                              f"pull) to use it")
    if version < OLDEST_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {version}, from before the "
                              f"format this code reads (version {OLDEST_VERSION} on): train "
                              f"the model again, or use the release of the project that wrote "
                              f"it")
    for step in range(version, CHECKPOINT_VERSION):
        ckpt = {**MIGRATIONS[step](dict(ckpt)), "version": step + 1}
    return ckpt


NOTED = set()  # the settings whose older-record value was named on the console (once each)


def note_older(path, key, value):
    if key not in NOTED:
        NOTED.add(key)
        print(f"note: {path} was recorded before the setting {key} existed: read as "
              f"{key}={settings_lib.plain(value)!r}, what the code did then")


def with_older_settings(ckpt, path="checkpoint", older=None):
    """A record written before a recorded setting existed gets that setting's older-record
    value (the behaviour the code had then), never today's default; each is named once on
    the console. `older`: {key: value}, settings.older_values of train_model's table (None:
    nothing filled here; `setting` reads each one when it is used)."""
    saved = ckpt.get("settings")
    missing = {k: v for k, v in (older or {}).items()
               if isinstance(saved, dict) and k not in saved}
    for key, value in missing.items():
        note_older(path, key, value)
    if not missing:
        return ckpt
    return {**ckpt, "settings": {**saved, **{k: settings_lib.plain(v)
                                             for k, v in missing.items()}}}


def setting(ckpt, key, path="checkpoint"):
    """One recorded setting of a checkpoint, as inference reads it: the recorded value, or
    for a record written before the setting existed its older-record value (train_model.py's
    row, read once through `--print-settings`), named once on the console."""
    saved = ckpt["settings"]
    if key in saved:
        return saved[key]
    older = training_older_values()
    if key not in older:
        raise CheckpointError(f"{path} records no {key!r}, which every record holds: the "
                              f"file is damaged or was not written by train_model.py")
    note_older(path, key, older[key])
    return settings_lib.plain(older[key])


_TRAINING_OLDER = []


def training_older_values():
    """{key: older-record value} of train_model.py's SETTINGS (settings.older_values), read
    once from `python train_model.py --print-settings`: a module never imports a script."""
    if not _TRAINING_OLDER:
        rows = settings_lib.read_script(TRAIN_SCRIPT)
        _TRAINING_OLDER.append({row["key"]: row["older"] for row in rows.values()
                                if row["role"] != settings_lib.MACHINE and "older" in row})
    return _TRAINING_OLDER[0]


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
        model = build_model(setting(ckpt, "encoder", path), None,
                            setting(ckpt, "encoder_depth", path), setting(ckpt, "arch", path))
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
    its tensors into memory (migrated as load_checkpoint does); {} for a file of another
    format or of a version this code cannot read."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        ckpt = migrate(ckpt, path)
    except Exception:  # an unreadable file is reported where it is loaded for real
        return {}
    fields = {**ckpt["settings"], **{k: v for k, v in ckpt.items() if k != "settings"}}
    return {k: fields.get(k) for k in keys}
