"""What training and inference share: building the FPN, encoder weights (hub or a local file),
the checkpoint format, the device, and the mixed-precision / channels_last context."""
import math
import os
import socket
import threading
from contextlib import nullcontext
from pathlib import Path

import torch

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


def build_model(encoder, encoder_weights=None, depth=5):
    """smp.FPN with one output class (logits). `encoder_weights`: "imagenet", None or a path."""
    import segmentation_models_pytorch as smp

    check_encoder(encoder)
    hub = encoder_weights == "imagenet"
    if hub:
        check_hub(encoder)
    try:
        model = smp.FPN(encoder_name=encoder, encoder_weights="imagenet" if hub else None,
                        encoder_depth=depth, classes=1,
                        # smp's decoder output stride shrinks with the depth: this factor
                        # brings the mask back to the input size at depths 3, 4 and 5
                        upsampling=2 ** (depth - 3))
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

# the settings that shape the input: inference reads them from the checkpoint, never a constant
INPUT_KEYS = ("image_size", "encoder_depth", "interpolation", "mean", "std")


def checkpoint_record(model, settings, epoch, valid_iou):
    """The best-model checkpoint: tensors and plain values, everything inference needs."""
    return {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
        "model_state": {k.removeprefix("module."): v.detach().cpu()
                        for k, v in model.state_dict().items()},
        "encoder": settings["encoder"], "encoder_depth": settings["encoder_depth"],
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
        model = build_model(ckpt["encoder"], None, ckpt["encoder_depth"])
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
