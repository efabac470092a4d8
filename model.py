"""What training, inference and the benchmarks share: building the FPN, encoder weights (hub
or a local file), the checkpoint format and the names of a run's files, the device, the
mixed-precision / channels_last context, the processes under torchrun, the one training
step and validation that train_model.py runs and the benchmarks time, and the format of the
ONNX files export_model.py writes, run through onnxruntime."""
import hashlib
import math
import os
import re
import socket
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import metrics
import preprocess

CHECKPOINT_FORMAT = "melanoma-fpn-checkpoint"
CHECKPOINT_VERSION = 1
HUB_HOST = "huggingface.co"  # where segmentation-models-pytorch fetches "imagenet" weights
HUB_PROBE_SECONDS = 4.0  # an offline machine is told so within this, not after 30 s of retries


class SettingError(ValueError):
    """A setting that cannot work; the message names the constant."""


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint of this project; the message says why."""


# ----------------------------------------------------------------------------- building

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


def fpn_arguments(depth):
    # smp's FPN decoder output stride shrinks with the depth: this factor brings the mask
    # back to the input size at depths 3, 4 and 5
    return {"upsampling": 2 ** (depth - 3)}


def unet_arguments(depth):
    # one decoder stage per encoder stage: smp's default channels, the deepest ones dropped
    return {"decoder_channels": (256, 128, 64, 32, 16)[5 - depth:]}


def no_arguments(depth):
    return {}


# ARCH: the segmentation-models-pytorch class, and its arguments beyond the shared ones
# (encoder_name, encoder_weights, encoder_depth, classes). A new one is a line here.
ARCHITECTURES = {"FPN": fpn_arguments, "Unet": unet_arguments, "UnetPlusPlus": unet_arguments,
                 "DeepLabV3Plus": no_arguments}


def check_arch(arch):
    if arch not in ARCHITECTURES:
        raise SettingError(f"ARCH {arch!r} is not one of {', '.join(ARCHITECTURES)}")


def build_model(encoder, encoder_weights=None, depth=5, arch="FPN"):
    """The ARCH network of segmentation-models-pytorch with one output class (logits).
    `encoder_weights`: "imagenet", None or a path."""
    import segmentation_models_pytorch as smp

    check_arch(arch)
    check_encoder(encoder)
    hub = encoder_weights == "imagenet"
    if hub:
        check_hub(encoder)
    try:
        model = getattr(smp, arch)(encoder_name=encoder,
                                   encoder_weights="imagenet" if hub else None,
                                   encoder_depth=depth, classes=1, **ARCHITECTURES[arch](depth))
    except (OSError, ConnectionError, RuntimeError) as exc:
        if not hub:
            raise
        raise SettingError(offline_message(encoder, exc.__class__.__name__)) from None
    if encoder_weights not in (None, "imagenet"):
        load_encoder_weights(model, encoder_weights, encoder)
    return model


def offline_message(encoder, cause):
    return (f"ENCODER_WEIGHTS='imagenet': the download of the {encoder} weights failed "
            f"({cause}). Offline, pass --encoder-weights PATH with a local weights file for "
            f"this encoder, or --encoder-weights none to train from scratch.")


def check_hub(encoder):
    """Fail within seconds when the weights are neither cached nor reachable.

    Without this, huggingface_hub retries for about 30 s and prints a line per retry."""
    import segmentation_models_pytorch as smp

    settings = smp.encoders.encoders.get(encoder, {}).get("pretrained_settings", {})
    hub = settings.get("imagenet")
    if not hub:
        return  # timm encoders: smp's own error path applies
    from huggingface_hub import try_to_load_from_cache
    cached = try_to_load_from_cache(hub["repo_id"], "model.safetensors", revision=hub["revision"])
    if isinstance(cached, str):
        return
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # huggingface_hub reads both
        if os.environ.get(variable, "").lower() in ("1", "true", "yes", "on"):
            raise SettingError(offline_message(encoder, f"{variable} is set and the weights "
                                                        f"are not cached"))
    reached = []

    def probe():
        try:
            socket.create_connection((HUB_HOST, 443), timeout=HUB_PROBE_SECONDS).close()
            reached.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)  # name lookup has no timeout of its own
    thread.start()
    thread.join(HUB_PROBE_SECONDS)
    if not reached:
        raise SettingError(offline_message(encoder, f"{HUB_HOST} cannot be reached"))


def load_encoder_weights(model, path, encoder):
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
    own = model.encoder.state_dict()
    # an ImageNet classifier's head (torchvision, pretrainedmodels, EfficientNet, MobileOne)
    heads = ("fc.", "_fc.", "last_linear.", "classifier.", "head.", "linear.")
    state = {k: v for k, v in ((k.removeprefix("module.").removeprefix("encoder."), v)
                               for k, v in state.items() if torch.is_tensor(v))
             if k in own or not k.startswith(heads)}
    # batch-norm step counters: absent from some older files and unused in training
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise SettingError(f"ENCODER_WEIGHTS: {path} does not fit the {encoder} "
                           f"encoder: {len(missing)} weights missing, {len(unexpected)} "
                           f"unexpected (e.g. {example!r})")
    wrong = [k for k in state if state[k].shape != own[k].shape]
    if wrong:
        raise SettingError(f"ENCODER_WEIGHTS: {path} does not fit the {encoder} "
                           f"encoder: {len(wrong)} weights of another shape (e.g. {wrong[0]!r}: "
                           f"{tuple(state[wrong[0]].shape)}, not {tuple(own[wrong[0]].shape)})")
    # nn.Module's own loader: smp's encoders override load_state_dict and return nothing
    torch.nn.Module.load_state_dict(model.encoder, state, strict=False)


LOSSES = ("dice", "dice+bce")
DEVICES = ("auto", "cpu", "cuda")


def make_loss(name="dice"):
    """The training loss on logits: the paper's Dice, or Dice plus binary cross-entropy."""
    import segmentation_models_pytorch as smp

    dice = smp.losses.DiceLoss("binary", from_logits=True)
    if name == "dice":
        return dice
    if name == "dice+bce":
        bce = torch.nn.BCEWithLogitsLoss()
        return lambda logits, masks: dice(logits, masks) + bce(logits, masks)
    raise SettingError(f"LOSS={name!r}: use 'dice' or 'dice+bce'")


def optimizer_step(loss, optimizer, scaler=None):
    """Backward and step; through the GradScaler when float16 autocast needs one."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


# ----------------------------------------------------------------------------- device

def pick_device(name):
    """torch.device for DEVICE ("auto", "cuda" or "cpu")."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SettingError("DEVICE='cuda' but no CUDA device is available; use --device auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def cpu_has_native_bf16():
    """True where the processor computes in bfloat16 itself (AVX-512 BF16 or AMX), so oneDNN's
    bf16 convolutions are faster than float32. oneDNN's own bf16 test alone is not enough: it
    passes on any AVX-512 processor, where bf16 is emulated and slower than float32."""
    return (torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported()
            and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))


def autocast_dtype(device, mixed):
    """The dtype autocast computes in on `device` when `mixed`, or None (float32): bfloat16
    (else float16) on CUDA, bfloat16 on a CPU with native bf16, float32 on other CPUs."""
    if not mixed:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def autocast(device, mixed):
    """Autocast in autocast_dtype(device, mixed); nothing where that is float32."""
    dtype = autocast_dtype(device, mixed)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def use_channels_last(device, channels_last, mixed):
    """channels_last where it is faster: on CUDA, and on the CPU under bfloat16 only
    (benchmarks/pipeline.py: faster there for the paper's encoder; in float32 it did not
    speed up training on the CPU)."""
    if device.type == "cuda":
        return channels_last
    return channels_last and autocast_dtype(device, mixed) is not None


def precision_line(device, mixed, channels_last):
    """What the model computes in, for the startup line; losses and metrics stay float32."""
    dtype = autocast_dtype(device, mixed)
    if dtype is None:
        why = "" if not mixed or device.type != "cpu" else \
            " (this CPU has no native bfloat16: no AVX-512 BF16 or AMX)"
        text = f"float32{why}"
    else:
        text = f"{str(dtype).replace('torch.', '')} autocast (loss, metrics, probabilities " \
               f"in float32)"
    return text + (", channels_last" if use_channels_last(device, channels_last, mixed) else "")


def to_device(images, device, channels_last):
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def weights_finite(model):
    """True when no weight or batch-norm statistic is NaN or infinite."""
    return all(torch.isfinite(t).all() for t in model.state_dict().values()
               if t.is_floating_point())


@torch.inference_mode()
def probabilities(model, images, device, mixed=False, channels_last=False):
    """(N, H, W) float32 lesion probabilities at network size for a (N, 3, H, W) batch."""
    model.eval()
    with autocast(device, mixed):
        logits = model(to_device(images, device, channels_last))
    return torch.sigmoid(logits.float())[:, 0]  # sigmoid in float32, not in bfloat16


TTA_MODES = ("none", "flips", "flips+rot90")


def tta_views(tta, square):
    """(transform, inverse) pairs on (N, C, H, W) tensors: the identity, then the flips, then
    for "flips+rot90" the 90-degree turns of each (8 views of a square input in all)."""
    def view(k, flip):
        dims = [3] if flip else []

        def forward(x):
            x = x.flip(dims) if dims else x
            return torch.rot90(x, k, (2, 3)) if k else x

        def inverse(y):
            y = torch.rot90(y, -k, (2, 3)) if k else y
            return y.flip(dims) if dims else y
        return forward, inverse

    if tta == "none":
        return [view(0, False)]
    if tta == "flips":  # identity, horizontal, vertical (a half turn of a horizontal flip), both
        return [view(0, False), view(0, True), view(2, True), view(2, False)]
    if tta == "flips+rot90":
        if not square:
            raise SettingError("TTA='flips+rot90' needs a square IMAGE_SIZE; use 'flips'")
        return [view(k, flip) for k in range(4) for flip in (False, True)]
    raise SettingError(f"TTA={tta!r}: use one of {', '.join(TTA_MODES)}")


@torch.inference_mode()
def tta_probabilities(model, images, device, tta="none", mixed=False, channels_last=False):
    """Mean lesion probability over the test-time views of a batch, mapped back to place."""
    views = tta_views(tta, images.shape[-1] == images.shape[-2])
    total = None
    for forward, inverse in views:
        probs = probabilities(model, forward(images), device, mixed, channels_last)
        probs = inverse(probs[:, None])
        total = probs if total is None else total + probs
    return total[:, 0] / len(views)


# ----------------------------------------------------------------------------- checkpoints

def checkpoint_record(model, settings, epoch, valid_iou):
    """The best-model checkpoint: tensors and plain values, everything inference needs."""
    return {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
        "model_state": {k.removeprefix("module."): v.detach().cpu()
                        for k, v in model.state_dict().items()},
        "arch": settings["arch"], "encoder": settings["encoder"], "encoder_depth": settings["encoder_depth"],
        "image_size": list(settings["image_size"]), "threshold": settings["threshold"],
        "interpolation": settings.get("interpolation", preprocess.INTERPOLATION),
        "mean": list(settings.get("mean", preprocess.IMAGENET_MEAN)),
        "std": list(settings.get("std", preprocess.IMAGENET_STD)),
        "epoch": epoch, "valid_iou": None if valid_iou is None or math.isnan(valid_iou)
        else valid_iou, "demo": settings.get("demo", False),
        "data_dir": str(Path(settings.get("data", ".")).resolve()),
        "split_file": str(settings.get("split_file", "")), "fold": settings.get("fold"),
        "folds": settings.get("folds", 1), "seed": settings.get("seed"),
        "recipe": dict(settings.get("recipe", {})),  # how it was trained: LR, LOSS, AUGMENT...
        # which images: all the data folder's pairs, and this run's train+valid pairs
        "data_digest": settings.get("data_digest"), "split_digest": settings.get("split_digest"),
    }


def input_settings(ckpt):
    """The preprocessing a checkpoint was trained with (older files: the defaults of then)."""
    return preprocess.InputSettings(
        size_hw=tuple(ckpt["image_size"]),
        interpolation=ckpt.get("interpolation", preprocess.INTERPOLATION),
        mean=tuple(ckpt.get("mean", preprocess.IMAGENET_MEAN)),
        std=tuple(ckpt.get("std", preprocess.IMAGENET_STD)))


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
    if not isinstance(ckpt.get("version"), int) or ckpt["version"] > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {ckpt.get('version')!r}; this "
                              f"code reads version {CHECKPOINT_VERSION} or older")
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
    """Rebuild the FPN a checkpoint describes and load its weights."""
    try:
        model = build_model(ckpt["encoder"], None, ckpt["encoder_depth"], ckpt["arch"])
        model.load_state_dict(ckpt["model_state"])
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as exc:
        # SettingError (an unknown recorded encoder) is a ValueError
        raise CheckpointError(f"{path} does not fit its recorded model "
                              f"(encoder {ckpt.get('encoder')!r}): "
                              f"{str(exc).splitlines()[0][:160]}") from None
    return model


def load_model(path, device, channels_last=False, mixed=False):
    """(model in eval mode on device, checkpoint dict) of a checkpoint file; channels_last
    where use_channels_last(device, channels_last, mixed) says it is faster."""
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path).to(device).eval()
    if use_channels_last(device, channels_last, mixed):
        model = model.to(memory_format=torch.channels_last)
    return model, ckpt


# ----------------------------------------------------------------------------- a run's files

# what train_model.py writes per run, by role: <stem><suffix> in the model folder
RUN_FILES = {"best": ".pth", "last": "_last.pth", "log": "_log.csv", "curves": "_curves.png",
             "data_report": "_data.txt"}
RUN_STEM = re.compile(r"^(?P<demo>demo_)?(?P<encoder>.+?)(?:_fold(?P<fold>\d+))?$")


def run_stem(encoder, fold=None, demo=False):
    """The name a run's files share: <encoder>, demo_<encoder>, <encoder>_fold<I>."""
    return ("demo_" if demo else "") + encoder + ("" if fold is None else f"_fold{fold}")


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
    fold = RUN_STEM.match(stem_of(path))["fold"]
    return None if fold is None else int(fold)


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
    """A few plain fields of a checkpoint, read without loading its tensors into memory."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # an unreadable file is reported where it is loaded for real
        return {}
    return {k: ckpt.get(k) for k in keys} if isinstance(ckpt, dict) else {}


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


# ----------------------------------------------------------------------------- the step

class NonFiniteLoss(RuntimeError):
    """The loss or the model became NaN or infinite; the message names the epoch and step."""


@dataclass
class Trainer:
    """The model and how a step runs on it: what train_one_epoch and validate need."""
    model: torch.nn.Module
    loss_fn: object
    device: torch.device
    optimizer: object = None
    scaler: object = None  # a GradScaler under float16 autocast
    mixed: bool = False  # autocast (see autocast())
    channels_last: bool = False
    threshold: float = 0.5

    def logits(self, images):
        with autocast(self.device, self.mixed):
            return self.model(to_device(images, self.device, self.channels_last))


@dataclass
class EpochResult:
    loss: float  # mean training loss over the images trained on
    images: int  # images trained on, all processes together
    skipped: int  # images read but skipped with a batch that came back empty elsewhere


def train_one_epoch(trainer, loader, epoch, iter_log=None, progress=True):
    """One pass over the training loader: the training step, batch after batch.

    `iter_log`, when a list, receives (loss, mean IoU of the batch at network size) per step:
    the paper's Figures 8 and 9."""
    from tqdm import tqdm

    trainer.model.train()
    total, seen, skipped = 0.0, 0, 0
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not progress)
    for step, batch in enumerate(bar, 1):
        # every file of the batch became unreadable: skip the step, and under torchrun every
        # process skips it, or the others would wait in the gradient all-reduce for this one
        (empty,) = sum_over_processes(1.0 if batch is None else 0.0)
        if empty:
            skipped += 0 if batch is None else len(batch[0])  # read, but skipped with it
            continue
        images, masks = batch[0], batch[1].to(trainer.device)
        logits = trainer.logits(images)
        loss = trainer.loss_fn(logits.float(), masks)  # in float32: float16 sums overflow
        loss_value = loss.item()  # one device sync per step, reused below
        _stop_if_not_finite(loss_value, epoch, step)
        optimizer_step(loss, trainer.optimizer, trainer.scaler)
        n = images.shape[0]
        total += loss_value * n
        seen += n
        if iter_log is not None:
            with torch.no_grad():
                counts = metrics.batch_confusion(torch.sigmoid(logits.float()), masks,
                                                 trainer.threshold)
            iter_log.append((loss_value, metrics.mean_scores(counts.tolist())["iou"]))
        bar.set_postfix(loss=f"{total / seen:.4f}")
    total, seen, skipped = sum_over_processes(total, seen, skipped)
    return EpochResult(total / max(seen, 1), int(seen), int(skipped))


def _stop_if_not_finite(loss_value, epoch, step):
    """Under torchrun every process learns of a NaN anywhere and stops at the same step,
    before the optimiser step: the weights and every checkpoint stay as they were."""
    (broken,) = sum_over_processes(0.0 if math.isfinite(loss_value) else 1.0)
    if broken:
        value = loss_value if not math.isfinite(loss_value) else "NaN in another process"
        raise NonFiniteLoss(f"the training loss became {value} at epoch {epoch}, step {step}; "
                            f"stopped before updating the model (the best checkpoint is "
                            f"untouched). Lower LR, or turn MIXED_PRECISION off.")


@torch.inference_mode()
def validate(trainer, loader, threads=2):
    """Mean loss (at network size) and per-image mean scores at each image's original size.

    Each probability map is resized to its true mask's size and cut at the threshold exactly
    as test_model.py --evaluate does, so the CSV, the choice of the best checkpoint and the
    evaluation report the same numbers. The true masks come with the batches (packed bits,
    from the cache): no original is decoded per epoch or held beyond its batch."""
    trainer.model.eval()
    losses = []

    def per_image():
        for batch in loader:
            if batch is None:
                continue
            images, masks, _, truths = batch
            logits = trainer.logits(images).float()
            losses.append((trainer.loss_fn(logits, masks.to(trainer.device)).item(),
                           len(images)))
            for prob, (bits, hw) in zip(torch.sigmoid(logits)[:, 0].cpu().numpy(), truths):
                yield prob, bits, hw

    def score(prob, bits, hw):  # in the scoring threads, beside the model
        return metrics.confusion_at_original(prob, preprocess.unpack_truth(bits, hw),
                                             trainer.threshold)

    # each process scores its share of the images; every image is counted once, everywhere
    counts = gather(preprocess.ordered_map(score, per_image(), threads))
    result = metrics.mean_scores(counts)
    total, seen = sum_over_processes(sum(loss * n for loss, n in losses),
                                     sum(n for _, n in losses))
    result["loss"] = total / seen if seen else float("nan")
    return result
# ----------------------------------------------------------------------------- ONNX files

ONNX_FORMAT = "melanoma-fpn-onnx"  # export_model.py's marker in the file's metadata
ONNX_VERSION = 1
# what test_model.py needs from an exported file's metadata
ONNX_KEYS = ("format", "version", "encoder", "network_size", "interpolation", "mean", "std",
             "threshold", "tta", "views", "recipe", "sources", "members", "opset")


def onnx_metadata(path):
    """The metadata of a file written by export_model.py; CheckpointError says what is wrong
    with any other file (missing, not ONNX, or lacking the graph or metadata it needs)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no ONNX file at {path}: write one with `python export_model.py "
                              f"--checkpoint MODEL.pth`")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable ONNX file "
                              f"({exc.__class__.__name__})") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    lacks = [f"metadata '{k}'" for k in ONNX_KEYS if k not in meta]
    inputs = {i.name: i.type.tensor_type for i in proto.graph.input}
    outputs = {o.name for o in proto.graph.output}
    if "image" not in inputs or inputs["image"].elem_type != onnx.TensorProto.UINT8 \
            or len(inputs["image"].shape.dim) != 3:
        lacks.append("an input 'image' of uint8 (height, width, 3)")
    lacks += [f"an output '{name}'" for name in ("probability", "mask") if name not in outputs]
    if lacks:
        raise CheckpointError(f"{path} was not made by export_model.py: it lacks "
                              f"{', '.join(lacks)}")
    if meta["format"] != ONNX_FORMAT or not meta["version"].isdigit() \
            or int(meta["version"]) > ONNX_VERSION:
        raise CheckpointError(f"{path} has format {meta['format']!r} version "
                              f"{meta['version']!r}; this code reads {ONNX_FORMAT!r} version "
                              f"{ONNX_VERSION} or older")
    return meta


def onnx_session(path, threads=None):
    """An onnxruntime CPU session of an exported file with as many threads as torch uses
    (OMP_NUM_THREADS, which onnxruntime itself ignores); its warnings hidden, among them the
    note that the optional input output_size can be overridden, as it is meant to be."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads or torch.get_num_threads()
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxPredictor:
    """An exported file run by onnxruntime's CPU provider, with the interface of
    test_model.Predictor. The graph does the resizing, views and mean itself: it is given each
    image as preprocess.read_image decodes it for the PyTorch path (a JPEG at reduced scale;
    grey, RGBA and 16-bit images converted alike) and returns the probability map at the
    image's own size."""

    def __init__(self, path, tta="none"):
        import json

        meta = onnx_metadata(path)
        if tta not in ("none", meta["tta"]):
            raise SettingError(f"TTA={tta!r}: {path} holds the test-time views "
                               f"{meta['tta']!r}; export again with `python export_model.py "
                               f"--tta {tta}`")
        self.path, self.meta, self.tta = Path(path), meta, meta["tta"]
        records = json.loads(meta["members"])
        self.ckpt = dict(records[0], threshold=float(meta["threshold"]))
        self.members = [(None, record, self.path) for record in records]
        self.settings = preprocess.InputSettings(
            tuple(records[0]["image_size"]), records[0]["interpolation"],
            tuple(records[0]["mean"]), tuple(records[0]["std"]))
        # the decode scale must serve every member: the largest network side of each axis
        self.decode_hw = tuple(max(r["image_size"][i] for r in records) for i in (0, 1))
        self.device = torch.device("cpu")
        self.session = onnx_session(path)

    why = "given by --checkpoint"  # how the file was chosen, for the console

    def name(self):
        return f"{self.path.name} (onnxruntime)"

    def describe(self):
        """What a result names beside its scores (as test_model.Predictor.describe)."""
        return {"models": [{"checkpoint": str(self.path), "encoder": r.get("encoder"),
                            "image_size": list(r.get("image_size", [])),
                            "epoch": r.get("epoch"), "trained_on": r.get("data_dir"),
                            "exported_from": r.get("file")} for r in
                           (record for _, record, _ in self.members)]}

    def runtime(self):
        import onnxruntime
        return (f"{self.path} runs through onnxruntime {onnxruntime.__version__} "
                f"({', '.join(self.session.get_providers())}): resizing, views "
                f"({self.tta}) and the mean over {len(self.members)} member(s) inside the graph")

    def probability(self, image, hw=None):
        """(H, W) float32 map of a uint8 (H, W, 3) image, or at `hw` (the graph resizes the
        network-size map straight to it)."""
        feed = {"image": image}
        if hw is not None and tuple(hw) != image.shape[:2]:
            feed["output_size"] = np.array(hw, np.int64)
        return self.session.run(["probability"], feed)[0]

    def image(self, image_path, exif=True, hw=None):
        """Probability map at the image's size as read (or at `hw`). A JPEG is decoded at the
        reduced scale the PyTorch path decodes it at (preprocess.eval_input), so that the two
        agree (for an ensemble of several sizes, the scale its largest member needs); the
        graph is told the image's own size for its outputs."""
        image = preprocess.read_image(image_path, min_hw=self.decode_hw, exif=exif)
        if hw is None:
            info = preprocess.image_info(image_path)
            hw = (info["height"], info["width"])
            if not exif and info["orientation"] in (5, 6, 7, 8):
                hw = hw[::-1]
        return self.probability(image, hw)

    def batch(self, images, pairs):
        """Each pair's image read again (the loader's small tensors are not used)."""
        return [self.image(p.image, p.exif) for p in pairs]
