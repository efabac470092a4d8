"""Train a lesion segmentation network (the paper's FPN by default) on ISIC images.

    python train_model.py                 # the paper's settings, data in data/
    python train_model.py --demo          # a minute or a few on a laptop CPU, generated data
    python train_model.py --resume        # continue the stopped run in Model/, as it was set up
    torchrun --nproc_per_node=4 train_model.py   # 4 GPUs, one process each (DDP)

Edit the constants below for an experiment, or pass the flag SETTINGS gives each one
(`python train_model.py --help` lists them with their defaults).
"""
import argparse
import math
import os
import shutil
import sys
import time
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import demo_data
import device as device_lib
import engine
import load_dataset
import metrics
import model as model_lib
import preprocess
from checkpoint import CheckpointError
from device import main_process, rank, world_size
from engine import NonFiniteLoss, train_one_epoch, validate
from settings import FIXED, RECORDED, Setting, SettingError, none_or_str
import settings as settings_lib

# ----------------------------------------------------------------------------- settings
DATA_DIR = "data"
MODEL_DIR = "Model"
ARCH = "FPN"                       # the paper's network
ENCODER = "se_resnext50_32x4d"     # the paper's code used se_resnext50_32x4d
ENCODER_WEIGHTS = "imagenet"
ENCODER_DEPTH = 5
IMAGE_SIZE = (320, 320)            # (height, width)
EARLY_EPOCHS = 0                   # progressive resizing off: every epoch at IMAGE_SIZE
EARLY_IMAGE_SIZE = (224, 224)      # the training size of epochs 1 to EARLY_EPOCHS
MEAN = (0.485, 0.456, 0.406)       # ImageNet's, which the pretrained encoders expect
STD = (0.229, 0.224, 0.225)
BATCH_SIZE = 8
EPOCHS = 40                        # the paper's 40 epochs
LR = 1e-4                          # the paper's Adam: 1e-4, then 1e-5 after epoch 25
LR_DROP_EPOCH = 25
LR_AFTER_DROP = 1e-5
SCHEDULE = "step"                  # the paper's: LR, then LR_AFTER_DROP after LR_DROP_EPOCH
WARMUP_EPOCHS = 0.0
OPTIMIZER = "adam"                 # the paper's
WEIGHT_DECAY = 0.0
EMA_DECAY = 0.0                    # no weight average: the paper's
LOSS = "dice"                      # the paper's
DEEP_SUPERVISION = False           # the paper's: a loss on the output alone
AUGMENT = "full"
FOLDS = 1
THRESHOLD = 0.5
SEED = 42
WORKERS = min(8, max(1, (os.cpu_count() or 1) - 1))  # one core left to the model
DEVICE = "auto"
CACHE = True
MIXED_PRECISION = True
CHANNELS_LAST = True
CUDNN_BENCHMARK = True
DETERMINISTIC = False
SYNC_BATCHNORM = False

# What each setting is. FIXED: part of the run, recorded in every checkpoint; --resume takes
# it from the state and refuses a flag that differs. RECORDED: recorded, but a resume may
# change it. MACHINE: how this machine runs the run, free to differ on a resume.
SETTINGS = [
    Setting("DATA_DIR", "folder with the ISIC folders (see docs/data.md); a resume may point "
            "at a moved copy: its pairs must still be the run's", RECORDED, flag="--data"),
    Setting("MODEL_DIR", "checkpoints, per-epoch CSV and curves go here"),
    Setting("ARCH", "network of segmentation-models-pytorch: "
            f"{', '.join(model_lib.ARCHITECTURES)} (model.ARCHITECTURES)", FIXED),
    Setting("ENCODER", "encoder of segmentation-models-pytorch (resnet18, resnet34, "
            "se_resnext50_32x4d, efficientnet-b3, ...)", FIXED),
    Setting("ENCODER_WEIGHTS", '"imagenet" (downloaded), none (from scratch) or a local '
            "weights file", FIXED, type=none_or_str),
    Setting("ENCODER_DEPTH", "down-sampling stages (3 to 5): image sides must be multiples of "
            "2**depth", FIXED),
    Setting("IMAGE_SIZE", "(height, width) every image is resized to", FIXED,
            metavar=("H", "W")),
    Setting("EARLY_EPOCHS", "progressive resizing: epochs 1 to EARLY_EPOCHS train at "
            "EARLY_IMAGE_SIZE, the later ones at IMAGE_SIZE (0: off); validation always at "
            "IMAGE_SIZE (measured on a CPU only: docs/results.md)", FIXED, older=0),
    Setting("EARLY_IMAGE_SIZE", "(height, width) of the training images in the early epochs: "
            "smaller than IMAGE_SIZE, to buy epochs in the same minutes", FIXED,
            metavar=("H", "W"), older=(224, 224)),
    Setting("MEAN", "input normalisation of 0..1 pixels: the mean", FIXED,
            metavar=("R", "G", "B")),
    Setting("STD", "input normalisation: the standard deviation", FIXED,
            metavar=("R", "G", "B")),
    Setting("BATCH_SIZE", "images per training step (per process under torchrun)", FIXED),
    Setting("EPOCHS", "epochs in all; a resume may raise it to extend the run", RECORDED),
    Setting("LR", "the learning rate through epoch LR_DROP_EPOCH (SCHEDULE step), or the peak "
            "(cosine, poly)", FIXED),
    Setting("LR_DROP_EPOCH", "the last epoch at LR; later epochs run at LR_AFTER_DROP", FIXED),
    Setting("LR_AFTER_DROP", "the learning rate after the drop", FIXED),
    Setting("SCHEDULE", '"step": LR, then LR_AFTER_DROP after LR_DROP_EPOCH (the paper\'s); '
            '"cosine": from LR down to 0 along a half cosine; "poly": LR * (1 - t/T)**0.9, '
            "nnU-Net's; cosine and poly change the rate every step (measured on a CPU only: "
            "docs/results.md)", FIXED, choices=engine.SCHEDULES, older="step"),
    Setting("WARMUP_EPOCHS", "epochs (a fraction allowed) over which the rate rises linearly "
            "from near 0 to LR, step by step, before SCHEDULE takes over", FIXED, older=0.0),
    Setting("OPTIMIZER", '"adam" (the paper\'s), "adamw" (decoupled WEIGHT_DECAY) or "sgd" '
            "(Nesterov momentum 0.99, nnU-Net's; LR near 1e-2)", FIXED,
            choices=engine.OPTIMIZERS, older="adam"),
    Setting("WEIGHT_DECAY", "weight decay (decoupled for adamw, L2 for adam and sgd)", FIXED,
            older=0.0),
    Setting("EMA_DECAY", "0: off; else the decay of a moving average of the weights, updated "
            "every step (warmed up as min(decay, (1+n)/(10+n))): validated, saved as the best "
            "and last model; 0.98 averages about the last 50 steps", FIXED, older=0.0),
    Setting("LOSS", "training loss on the logits", FIXED, choices=model_lib.LOSSES),
    Setting("DEEP_SUPERVISION", "FPN: also train a 1x1 head on each of the decoder's three "
            "coarsest pyramid levels (1/32, 1/16, 1/8 of the input at ENCODER_DEPTH 5), against "
            "the mask at that size, with the "
            "output's loss weighted 1, 1/2, 1/4, 1/8 as nnU-Net does; the heads stay out of the "
            "model files (measured on a CPU only: docs/results.md)", FIXED, older=False),
    Setting("AUGMENT", '"full": flips, 90-degree turns, small affine moves, colour jitter; '
            '"flips": flips and turns', FIXED, choices=preprocess.AUGMENTS),
    Setting("FOLDS", "K > 1: cross-validation, one run per fold (--fold I)", FIXED),
    Setting("THRESHOLD", "probability at or above which a pixel is lesion", FIXED),
    Setting("SEED", "seed of the model's start, the shuffling and the augmentation, and of the "
            "split the first time (then the split file wins)", FIXED),
    Setting("WORKERS", "loader processes decoding images beside the model",
            shown="cores - 1, at most 8"),
    Setting("DEVICE", '"auto" (CUDA when present), "cuda" or "cpu"',
            choices=device_lib.DEVICES),
    Setting("CACHE", "decode and resize each image once, then read the small copy"),
    Setting("MIXED_PRECISION", "bfloat16 (or float16) autocast on CUDA; bfloat16 on CPUs with "
            "native bf16 (AVX-512 BF16, AMX); else float32"),
    Setting("CHANNELS_LAST", "channels_last memory format, on CUDA and under CPU bfloat16"),
    Setting("CUDNN_BENCHMARK", "let cuDNN pick the fastest kernels for the fixed input size"),
    Setting("DETERMINISTIC", "CUDA: deterministic kernels where PyTorch has them (slower; turns "
            "CUDNN_BENCHMARK off; it warns for each operation that has none)"),
    Setting("SYNC_BATCHNORM", "under torchrun: batch-norm statistics over all processes"),
]

# --demo (not a setting of its own): sized for a 2-core CPU in a minute or two; outputs under
# names no one takes for ISIC
DEMO = dict(data="data/demo", model_dir="Model/demo", encoder="resnet18", encoder_weights=None,
            image_size=(96, 96), batch_size=8, epochs=8, lr=1e-3, lr_drop_epoch=6,
            lr_after_drop=1e-4)
# ---------------------------------------------------------------------------------------

LISTED_FILES = 20  # corrected/skipped files named on the console; the data report lists all
CHECKPOINT_COPIES = 7  # model sizes on disk at the worst moment: best + last (3x, with Adam's
                       # two moments) + the temporary copy of the last being written


class Interrupted(Exception):
    """Ctrl-C during training; the message says which epoch the resume state holds."""


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    settings_lib.add_flags(p, SETTINGS, globals())
    p.add_argument("--fold", type=int, default=argparse.SUPPRESS,  # unset: not given
                   help="with FOLDS=K: the fold (0..K-1) that validates; the others train")
    p.add_argument("--resume", action="store_true",
                   help="continue the run whose resume state is in --model-dir, with its own "
                        "settings (--epochs may extend it)")
    p.add_argument("--replace", action="store_true",
                   help="start this run over where --model-dir already holds it (or runs on "
                        "other data)")
    p.add_argument("--redraw-split", action="store_true",
                   help="draw the train/valid/test split anew (after the data changed)")
    p.add_argument("--demo", action="store_true",
                   help="train on generated demo data with CPU-sized settings")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def parse_args(argv=None):
    """The settings of a run: each constant, or the flag that replaces it. `args.given` holds
    the settings given on the command line (a resume takes the others from its state)."""
    args, args.given = settings_lib.parse(build_parser(), SETTINGS, globals(), argv)
    if hasattr(args, "fold"):
        args.given.add("fold")
    else:
        args.fold = None
    if args.demo:  # demo settings replace only what the command line does not set
        for key, value in DEMO.items():
            if key not in args.given:
                setattr(args, key, value)
    return args


def run_settings(args):
    """The one settings record every checkpoint of the run carries: the recorded settings,
    plus what else shapes the run (data folder, fold, demo, the resize interpolation)."""
    return {**settings_lib.recipe(SETTINGS, args), "data": str(Path(args.data).resolve()),
            "fold": args.fold, "demo": args.demo, "interpolation": preprocess.INTERPOLATION}


def check_settings(args):
    """Refuse, in one line naming the constant, a setting that cannot work."""
    if not 3 <= args.encoder_depth <= 5:
        raise SettingError(f"ENCODER_DEPTH={args.encoder_depth}: use 3, 4 or 5")
    size_ok = preprocess.permitted_size(args.image_size, args.encoder_depth)
    if size_ok != args.image_size:
        raise SettingError(f"IMAGE_SIZE={args.image_size} breaks the size rule: each side must "
                           f"be a multiple of 2**{args.encoder_depth} = {2 ** args.encoder_depth}"
                           f" (nearest: {size_ok})")
    if args.early_epochs:
        check_early_size(args)
    if args.deep_supervision and args.arch != "FPN":
        raise SettingError(f"DEEP_SUPERVISION supervises the FPN's pyramid levels: it needs "
                           f"ARCH FPN, not {args.arch}")
    model_lib.check_arch(args.arch)
    model_lib.check_encoder(args.encoder)
    if not 0.0 < args.threshold < 1.0:
        raise SettingError(f"THRESHOLD={args.threshold} must lie between 0 and 1")
    for constant, value in (("EPOCHS", args.epochs), ("BATCH_SIZE", args.batch_size)):
        if value < 1:
            raise SettingError(f"{constant}={value} must be at least 1")
    for constant, value in (("LR", args.lr), ("LR_AFTER_DROP", args.lr_after_drop)):
        if not value > 0:  # NaN fails this too
            raise SettingError(f"{constant}={value} must be greater than 0")
    for constant, value in (("WARMUP_EPOCHS", args.warmup_epochs),
                            ("WEIGHT_DECAY", args.weight_decay)):
        if not value >= 0:
            raise SettingError(f"{constant}={value} must be 0 or more")
    if not 0.0 <= args.ema_decay < 1.0:
        raise SettingError(f"EMA_DECAY={args.ema_decay} must be 0 (off) or lie between 0 and 1")
    if not all(s > 0 for s in args.std):
        raise SettingError(f"STD={args.std} must be greater than 0")
    if args.workers < 0:
        raise SettingError(f"WORKERS={args.workers} must be 0 or more")
    if args.folds < 1 or (args.folds > 1) != (args.fold is not None) or \
            (args.fold is not None and not 0 <= args.fold < args.folds):
        raise SettingError(f"FOLDS={args.folds} with --fold {args.fold}: pass --fold I with "
                           f"0 <= I < FOLDS when FOLDS > 1, and no --fold otherwise")


# ----------------------------------------------------------------------------- the run

@dataclass
class Progress:
    """How far a run has come; the resume state holds it."""
    start: int = 1  # the next epoch
    best_iou: float = -1.0
    rows: list = field(default_factory=list)  # the CSV's rows so far
    iter_log: list = field(default_factory=list)  # (loss, IoU) per training step
    unread: int = 0  # image reads that failed during training


@dataclass
class Run:
    """One training run: its settings, its files, what its checkpoints say of it, the trainer
    and its progress."""
    args: argparse.Namespace
    paths: dict
    record: dict  # what every checkpoint carries besides its weights (checkpoint.make_checkpoint)
    trainer: engine.Trainer = None
    progress: Progress = field(default_factory=Progress)


# the validation columns are the metrics the registry logs (metrics.py)
LOG_COLUMNS = ["epoch", "lr", "train_loss", "valid_loss",
               *(f"valid_{name}" for name in metrics.names(logged=True)), "seconds", "network"]


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
    preprocess.save_figure(fig, path)


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


# ----------------------------------------------------------------------------- resume

def find_resume_state(args):
    """The resume state of the run to continue: the one in the model folder, or the newest of
    those whose names fit the flags given (--arch, --encoder, --fold, --demo)."""
    states = checkpoint.resume_states(args.model_dir)

    def fits(path):
        name = checkpoint.RUN_STEM.match(checkpoint.stem_of(path))
        return name is not None and (
                ("arch" not in args.given or name["arch"] == args.arch.lower())
                and ("encoder" not in args.given or name["encoder"] == args.encoder)
                and ("fold" not in args.given or name["fold"] == str(args.fold))
                and (not args.demo or name["demo"]))
    pool = [p for p in states if fits(p)] or states
    if not pool:
        return None
    chosen = max(pool, key=lambda p: p.stat().st_mtime)
    if len(pool) > 1:
        print(f"note: {len(pool)} resume states in {args.model_dir}; continuing the newest, "
              f"{chosen.name} (the others: {', '.join(p.name for p in pool if p != chosen)}; "
              f"pass --arch, --encoder or --fold to pick one)")
    return chosen


def load_resume_state(path, args):
    """The saved state of an interrupted run; the run's settings are taken from it, and a flag
    given beside --resume that differs from them is refused (every one named)."""
    # a setting the state predates: its older-record value, named once (never today's default)
    state = checkpoint.load_checkpoint(path, older=settings_lib.older_values(SETTINGS))
    missing = [k for k in ("epoch", "best_iou", "optimizer_state", "history", "iter_log")
               if k not in state]
    if missing:
        raise CheckpointError(f"--resume: {path} is not a resume state (no {missing[0]!r}); "
                              f"delete it to start over")
    saved = state["settings"]
    differ = settings_lib.resume_conflicts(SETTINGS, saved, args, args.given)
    if "fold" in args.given and args.fold != saved["fold"]:
        differ.append(f"--fold {saved['fold']}, not {args.fold}")
    if differ:
        raise SettingError(f"--resume: {path} was made with {'; '.join(differ)}: drop these "
                           f"flags to continue it as it was, or pass another --model-dir for a "
                           f"new run")
    settings_lib.take_saved(SETTINGS, saved, args, args.given)
    args.fold, args.demo = saved["fold"], saved["demo"]
    if not Path(args.data).is_dir():
        raise SettingError(f"--resume: the run's data folder {args.data} is not there: pass "
                           f"--data with the folder's new place")
    return state


def start_training(args, state, paths, compute):
    """(model, optimizer, scaler, progress, weight average or None) for a new run, or as the
    resume state left them."""
    torch.manual_seed(args.seed)
    if state is None:
        model = model_lib.build_model(args.encoder, args.encoder_weights, args.encoder_depth,
                                      args.arch)
    else:  # with a weight average, model_state holds the average: the run's model
        model = checkpoint.model_from_checkpoint(state, paths["last"])
    average = None
    if args.ema_decay:
        average = engine.WeightAverage(model, args.ema_decay,
                                       state.get("average_updates", 0) if state else 0)
        if state is not None:
            model.load_state_dict(state["trained_model_state"])
    if args.deep_supervision:  # after the average's copy: the average never holds the heads
        model_lib.attach_deep_supervision(model)
        if state is not None:
            getattr(model, model_lib.DEEP_KEY).load_state_dict(state["deep_supervision_state"])
    # on the device before the optimiser reads its state: load_state_dict puts each moment
    # where its parameter is, and a later move leaves them behind (a resume on CUDA stopped
    # at its first step with moments on the CPU)
    model.to(compute.device)
    optimizer = engine.make_optimizer(model, args.lr, compute.device, args.optimizer,
                                      args.weight_decay)
    scaler = engine.make_scaler(compute.device, compute.mixed)
    if state is None:
        return model, optimizer, scaler, Progress(), average
    optimizer.load_state_dict(state["optimizer_state"])
    if scaler is not None and state.get("scaler_state"):
        scaler.load_state_dict(state["scaler_state"])
    progress = Progress(state["epoch"] + 1, state["best_iou"], state["history"],
                        [tuple(x) for x in state["iter_log"]], state.get("unread", 0))
    if state.get("processes", world_size()) != world_size() and main_process():
        print(f"note: the state was saved by a run of {state['processes']} process(es), "
              f"this one has {world_size()}: each process's share of an epoch changes, so "
              f"the run will not end exactly as a straight one would")
    return model, optimizer, scaler, progress, average


def check_same_split(state, record, path):
    """A run never continues on other images: the state's split digest must match."""
    saved = state.get("split_digest")
    if saved and saved != record["split_digest"]:
        raise SettingError(f"--resume: {path} trained on other images than "
                           f"{record['settings']['data']} "
                           f"now gives (train+valid digest {saved} there, "
                           f"{record['split_digest']} here): a run never continues on other "
                           f"data; start a new run with another --model-dir")


def check_early_size(args):
    early = tuple(args.early_image_size)
    if preprocess.permitted_size(early, args.encoder_depth) != early:
        raise SettingError(f"EARLY_IMAGE_SIZE={early} breaks the size rule: each side must be "
                           f"a multiple of 2**{args.encoder_depth} = {2 ** args.encoder_depth}")
    if any(e > s for e, s in zip(early, args.image_size)):
        raise SettingError(f"EARLY_IMAGE_SIZE={early} is larger than IMAGE_SIZE="
                           f"{tuple(args.image_size)}: progressive resizing starts smaller")
    if args.early_epochs >= args.epochs:
        raise SettingError(f"EARLY_EPOCHS={args.early_epochs} leaves no epoch at IMAGE_SIZE "
                           f"(EPOCHS={args.epochs}): the model would never train at the size it "
                           "is validated and used at")


def resume_state(run, epoch, valid_iou):
    """The last checkpoint: the run's model (the weight average where one is kept), plus
    what a resume needs: the optimiser, the trained weights beside their average, the logs."""
    trainer, progress = run.trainer, run.progress
    state = checkpoint.make_checkpoint(engine.evaluated(trainer).model, run.record, epoch,
                                       valid_iou)
    if trainer.average is not None:
        state.update(trained_model_state=checkpoint.make_checkpoint(
            trainer.model, run.record, epoch, valid_iou)["model_state"],
            average_updates=trainer.average.updates)
    heads = getattr(getattr(trainer.model, "module", trainer.model), model_lib.DEEP_KEY, None)
    if heads is not None:
        state.update(deep_supervision_state={k: v.detach().cpu()
                                             for k, v in heads.state_dict().items()})
    state.update(optimizer_state=trainer.optimizer.state_dict(), best_iou=progress.best_iou,
                 scaler_state=trainer.scaler.state_dict() if trainer.scaler is not None
                 else None, history=progress.rows,
                 iter_log=[list(x) for x in progress.iter_log], unread=progress.unread,
                 processes=world_size())
    return state


def check_epoch_finite(valid, model, epoch):
    """Stop before saving anything when validation shows a broken (NaN or inf) model."""
    if valid["images"] and not (math.isfinite(valid["loss"]) and math.isfinite(valid["iou"])):
        raise NonFiniteLoss(f"the validation loss became {valid['loss']} (IoU {valid['iou']}) "
                            f"at epoch {epoch}; stopped before saving (the best checkpoint "
                            f"and the resume state keep the previous epoch). Lower LR.")
    if not engine.weights_finite(model):
        raise NonFiniteLoss(f"the model's weights became NaN or infinite at epoch {epoch}; "
                            f"stopped before saving (the best checkpoint is untouched). "
                            f"Lower LR.")


# ----------------------------------------------------------------------------- other runs

def describe_run(path):
    """"epoch E of N, data D" of a run's checkpoint, read without loading its weights."""
    fields = checkpoint.checkpoint_fields(path, ("epoch", "epochs", "data"))
    of = f" of {fields['epochs']}" if fields.get("epochs") else ""
    return f"epoch {fields.get('epoch')}{of}, data {fields.get('data')}"


def check_own_files(args, paths):
    """A new run never silently replaces the run of the same name: it stops, offering the
    ways on (the demo, whose data is generated, replaces its own with a note)."""
    earlier = [p for key, p in paths.items() if key != "data_report" and p.exists()]
    if not earlier or args.resume and paths["last"].exists():
        return
    if not (args.replace or args.demo):
        held = paths["last"] if paths["last"].exists() else paths["best"]
        what = describe_run(held) if held.exists() else ", ".join(p.name for p in earlier)
        raise SettingError(f"{paths['best'].parent} already holds the run "
                           f"{checkpoint.stem_of(paths['best'])} ({what}): pass --resume to "
                           f"continue it, --model-dir NEW to keep both, or --replace to start "
                           f"it over")
    if main_process():
        print(f"note: this new run replaces the earlier one in {paths['best'].parent} "
              f"({', '.join(p.name for p in earlier)})")


def check_other_runs(args, paths, data_digest):
    """One model folder per dataset: stop before training when the folder holds a run on
    other data (unless --replace)."""
    if args.replace:
        return
    own = {p.name for p in paths.values()}
    for path in checkpoint.resume_states(args.model_dir) + checkpoint.best_models(args.model_dir):
        if path.name in own:
            continue
        fields = checkpoint.checkpoint_fields(path, ("data_digest", "data"))
        theirs = fields.get("data_digest")
        if theirs and theirs != data_digest:
            raise SettingError(f"{args.model_dir} holds {path.name}, trained on other data "
                               f"({fields.get('data')}): pass --model-dir NEW to keep the "
                               f"runs apart (one model folder per dataset), or --replace to "
                               f"train here anyway")


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    stdout = sys.stdout
    try:
        return run_and_report(args)
    finally:
        if sys.stdout is not stdout:  # the devnull of a silent torchrun process
            sys.stdout.close()
            sys.stdout = stdout
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


def resolve_run(args):
    """(the run's files, the resume state or None); with --resume the run's settings come
    from the state it finds."""
    found = find_resume_state(args) if args.resume else None
    if found is None:
        paths = checkpoint.run_files(args.model_dir, run_stem(args))
        if args.resume:
            args.resume = False
            print(f"no saved state at {paths['last']}: starting from the beginning")
        return paths, None
    state = load_resume_state(found, args)  # its settings now in args
    print(f"resuming after epoch {state['epoch']} (best valid IoU {state['best_iou']:.4f}) "
          f"of {found}: {args.arch} {args.encoder}, data {args.data}, {args.epochs} epochs in "
          f"all")
    return checkpoint.run_files(args.model_dir, checkpoint.stem_of(found)), state


def run_stem(args):
    return checkpoint.run_stem(args.arch, args.encoder, args.fold, args.demo)


def run(args):
    """The story of a run: settings, data, model, the epochs, a summary."""
    paths, state = resolve_run(args)
    check_settings(args)
    setup_processes(args)
    check_writable(paths["best"].parent)
    check_own_files(args, paths)
    if args.encoder_weights == "imagenet" and not args.resume:
        model_lib.check_hub(args.encoder)  # offline: one line now, not after the data scan
    found, splits, split_file = load_splits(args, paths["data_report"])
    if args.schedule == "step" and args.lr_drop_epoch >= args.epochs:
        print(f"note: LR_DROP_EPOCH={args.lr_drop_epoch} is not before the last epoch "
              f"({args.epochs}): the learning rate stays {args.lr:g}")
    # what every checkpoint of the run records besides its weights (checkpoint.py)
    record = {"settings": run_settings(args), "split_file": str(split_file),
              "data_digest": load_dataset.pairs_digest(
                  [p for pairs in found.splits.values() for p in pairs]),
              "split_digest": load_dataset.pairs_digest(splits["train"] + splits["valid"])}
    check_other_runs(args, paths, record["data_digest"])
    compute = device_lib.prepare(args.device, args.mixed_precision, args.channels_last,
                                 args.cudnn_benchmark, args.deterministic)
    print(compute.line())
    if state is not None:
        check_same_split(state, record, paths["last"])
    model, optimizer, scaler, progress, average = start_training(args, state, paths, compute)
    if progress.start > args.epochs:
        print(f"nothing to do: the run already finished its {args.epochs} epochs "
              f"(best model: {paths['best']})")
        return 0
    if main_process():
        warn_if_disk_low(paths["best"].parent, model)
    loss_fn = model_lib.make_loss(args.loss)
    if args.deep_supervision:
        loss_fn = model_lib.DeepSupervisedLoss(loss_fn, model)
    model = place_model(model, compute, args.sync_batchnorm)
    if average is not None:  # each process keeps its own: the weights are the same in all
        average.model.to(compute.device)
        if compute.channels_last:
            average.model.to(memory_format=torch.channels_last)
    run_ = Run(args, paths, record, engine.Trainer(
        model, loss_fn, compute.device, optimizer, scaler, compute.mixed,
        compute.channels_last, args.threshold, average=average), progress)
    loaders = make_loaders(splits, run_, compute.device, progress.start)
    run_.trainer.plan = lr_plan(args, len(loaders[0]))
    run_epochs(run_, loaders)
    print(f"best valid IoU {progress.best_iou:.4f} (per image, at original size); model: "
          f"{paths['best']}; log: {paths['log']}; curves: {paths['curves']}")
    if found.corrected or found.skipped or progress.unread:
        print(f"data: {len(found.skipped)} file(s) skipped and {len(found.corrected)} corrected "
              f"at the scan (listed in {paths['data_report']})"
              + (f"; {progress.unread} image read(s) failed during training (see the "
                 f"warnings)" if progress.unread else ""))
    return 0


def lr_plan(args, steps_per_epoch):
    """The per-step learning rates (engine.LRPlan), or None for the paper's step drop without
    warm-up, whose rate is set once an epoch."""
    if args.schedule == "step" and not args.warmup_epochs:
        return None
    return engine.LRPlan(args.schedule, args.lr, args.epochs * steps_per_epoch,
                         round(args.warmup_epochs * steps_per_epoch),
                         args.lr_drop_epoch * steps_per_epoch, args.lr_after_drop)


def place_model(model, compute, sync_batchnorm=False):
    """The model on its device, in channels_last where used, wrapped for DDP under torchrun."""
    device = compute.device
    model.to(device)
    if compute.channels_last:
        model.to(memory_format=torch.channels_last)
    if world_size() > 1:
        if sync_batchnorm:  # the same Parameter objects: the optimiser still holds them
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def run_epochs(run, loaders):
    """Train, validate, record and save, epoch after epoch; Ctrl-C says what is saved."""
    args, progress = run.args, run.progress
    full_loader, valid_loader, early_loader = loaders
    if early_loader is not None:
        print(f"progressive resizing: epochs {progress.start} to {args.early_epochs} train at "
              f"{args.early_image_size[0]}x{args.early_image_size[1]}, the later ones at "
              f"{args.image_size[0]}x{args.image_size[1]}")
    print(f"{'epoch':>5} {'lr':>8} {'train_loss':>10} {'valid_loss':>10} {'valid_iou':>9} "
          f"{'valid_dice':>10} {'valid_tj':>8} {'seconds':>7}")
    print("  (valid scores per image at original size; valid_tj: thresholded Jaccard, the "
          "ISIC 2018 ranking metric: an image's IoU, or 0 below 0.65)")
    epoch, saved_epoch = progress.start, progress.start - 1
    try:
        for epoch in range(progress.start, args.epochs + 1):
            t0 = time.time()
            if run.trainer.plan is None:  # else train_one_epoch sets it step by step
                engine.set_lr(run.trainer.optimizer, engine.lr_for_epoch(
                    epoch, args.lr, args.lr_drop_epoch, args.lr_after_drop))
            # dropout: each epoch's (and process's) draws depend on these alone
            torch.manual_seed(args.seed + epoch + 1_000_003 * rank())
            train_loader = early_loader if epoch <= args.early_epochs else full_loader
            for loader in (train_loader, valid_loader):
                loader.sampler.set_epoch(epoch)
            trained = train_one_epoch(run.trainer, train_loader, epoch, progress.iter_log,
                                      progress=not args.quiet)
            lr = run.trainer.optimizer.param_groups[0]["lr"]  # the epoch's last step's
            valid = validate(engine.evaluated(run.trainer), valid_loader,
                             threads=max(1, args.workers))
            check_epoch_finite(valid, run.trainer.model, epoch)
            record_epoch(run, epoch, lr, trained, valid, time.time() - t0)
            saved_epoch = epoch
            warn_of_missing_images(run, (train_loader, valid_loader), trained, valid, epoch)
    except KeyboardInterrupt:
        where = "" if Path(args.model_dir) == Path(MODEL_DIR) else f" --model-dir {args.model_dir}"
        raise Interrupted(
            f"in epoch {epoch}; the resume state {run.paths['last']} holds epoch {saved_epoch}: "
            f"continue with --resume{where}" if saved_epoch else
            f"in epoch {epoch}, before any epoch finished: nothing was saved") from None


def warn_of_missing_images(run, loaders, trained, valid, epoch):
    train_loader, valid_loader = loaders
    expected = world_size() * (len(train_loader) * run.args.batch_size
                               if train_loader.drop_last else len(train_loader.sampler))
    missing = (expected - trained.images - trained.skipped,
               len(valid_loader.dataset) - valid["images"])
    if trained.skipped:
        print(f"warning: epoch {epoch}: {trained.skipped} training image(s) were read but "
              f"skipped, with a batch that came back empty in another process", flush=True)
    if any(missing):
        run.progress.unread += sum(missing)
        print(f"warning: epoch {epoch}: {missing[0]} training and {missing[1]} validation "
              f"image(s) could not be read and were left out (the warnings name the files)",
              flush=True)


def record_epoch(run, epoch, lr, trained, valid, seconds):
    """The CSV row, the best checkpoint (when improved), the resume state, the curves."""
    progress, paths = run.progress, run.paths
    row = {"epoch": epoch, "lr": lr, "train_loss": round(trained.loss, 6),
           "valid_loss": round(valid["loss"], 6),
           **{f"valid_{name}": round(valid[name], 6) for name in metrics.names(logged=True)},
           "seconds": round(seconds, 1), "network": f"{run.args.arch} {run.args.encoder}"}
    progress.rows.append(row)
    # a NaN IoU (no validation image readable) compares False: never the best
    improved = math.isfinite(valid["iou"]) and valid["iou"] > progress.best_iou
    if improved:
        progress.best_iou = valid["iou"]
    if not main_process():  # the same numbers everywhere; one process writes them
        return
    try:  # the best model first: a resume state never counts a best model that is not there
        if improved:
            checkpoint.save_checkpoint(checkpoint.make_checkpoint(
                engine.evaluated(run.trainer).model, run.record, epoch, valid["iou"]),
                paths["best"])
        checkpoint.save_checkpoint(resume_state(run, epoch, valid["iou"]), paths["last"])
    except checkpoint.SaveError as exc:
        held = checkpoint.checkpoint_fields(paths["last"], ("epoch",)).get("epoch")
        raise checkpoint.SaveError(
            f"{exc}. Stopped at epoch {epoch}: " + (
                f"free some space, then --resume continues after epoch {held}" if held else
                "no epoch is saved yet")) from None
    preprocess.write_csv(paths["log"], progress.rows, LOG_COLUMNS)
    plot_curves(progress.rows, progress.iter_log, paths["curves"], title(run.args))
    print(f"{epoch:>5} {lr:>8.0e} {trained.loss:>10.4f} {valid['loss']:>10.4f} "
          f"{valid['iou']:>9.4f} {valid['dice']:>10.4f} {valid['threshold_jaccard']:>8.4f} "
          f"{row['seconds']:>7.1f}" + ("  *best" if improved else ""), flush=True)


def title(args):
    return f"{args.arch} {args.encoder}" + (" (DEMO data)" if args.demo else "") + f", {args.data}"


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
            if args.early_epochs:
                preprocess.PreprocessCache(load_dataset.cache_dir_for(args.data),
                                           args.early_image_size).build(
                    splits["train"], progress=not args.quiet)
        dist.barrier()
    return found, splits, split_file


def scan_and_split(args, report_path):
    if args.demo and not demo_data.is_complete(args.data):
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
    if len(found.sources) > 1:
        print(f"  merged {len(found.sources)} image folders: {', '.join(found.sources)}")
    for kind, entries in (("skipped", found.skipped), ("corrected", found.corrected)):
        for path, why in entries[:LISTED_FILES]:
            print(f"  {kind} {os.path.relpath(path, found.root)}: "
                  f"{why.replace(f'{found.root}{os.sep}', '')}")
        if len(entries) > LISTED_FILES:
            print(f"  ... and {len(entries) - LISTED_FILES} more {kind} (see {report_path})")
    preprocess.write_text(report_path, found.summary() + "\n" + "\n".join(
        f"Split {k}: {load_dataset.pairs_word(len(v))}" for k, v in splits.items()) + "\n")


def make_loaders(splits, run, device, start=1):
    """The training loader, the validation loader, and the training loader of the early
    epochs' smaller size (progressive resizing; None when off or when a resume starts after
    them), preprocessing as the run's checkpoints record it; the cache keeps each size."""
    args = run.args
    options = load_dataset.LoaderOptions(workers=args.workers, seed=args.seed,
                                         pin_memory=device.type == "cuda", rank=rank(),
                                         world=world_size())
    settings = checkpoint.input_settings(run.record)

    def loader(pairs, size, **kind):
        cache = (preprocess.PreprocessCache(load_dataset.cache_dir_for(args.data), size)
                 if args.cache else None)
        return load_dataset.make_loader(pairs, dataclasses.replace(settings, size_hw=size),
                                        args.batch_size, dataclasses.replace(options, cache=cache),
                                        **kind)

    size, early = tuple(args.image_size), tuple(args.early_image_size)
    return (loader(splits["train"], size, train=True, augment=args.augment),
            loader(splits["valid"], size, truth=True),
            loader(splits["train"], early, train=True, augment=args.augment)
            if start <= args.early_epochs else None)


# ----------------------------------------------------------------------------- device

def setup_processes(args):
    """Under torchrun: join the process group (NCCL for CUDA tensors with gloo for the small CPU
    ones, or gloo alone on the CPU), one process per GPU; rank > 0 stays silent. A plain
    `python train_model.py` sets nothing up."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return
    device = device_lib.pick_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # NCCL reduces CUDA tensors only; the small counts and flags (sum_over_processes,
    # gather) are CPU tensors and objects, which gloo carries beside it
    backend, carriers = (("cpu:gloo,cuda:nccl", "NCCL, with gloo for CPU tensors")
                         if device.type == "cuda" else ("gloo", "gloo"))
    dist.init_process_group(backend)
    if not main_process():
        sys.stdout = open(os.devnull, "w")  # one console: the first process speaks for all
        args.quiet = True  # main() closes it and puts the console back
    print(f"{world} processes on {device.type} ({carriers}); BATCH_SIZE={args.batch_size} per "
          f"process, {world * args.batch_size} per step")


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


if __name__ == "__main__":
    sys.exit(main())
