"""The network and its loss: ARCH and ENCODER -> a segmentation-models-pytorch model with one
output class (logits); encoder weights from the hub or a local file; Dice (or Dice + BCE)."""
import os
import socket
import threading
from pathlib import Path

import torch

from settings import SettingError

HUB_HOST = "huggingface.co"  # where segmentation-models-pytorch fetches "imagenet" weights
HUB_PROBE_SECONDS = 4.0  # an offline machine is told so within this, not after 30 s of retries


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


LOSSES = ("dice", "dice+bce", "lovasz", "dice+bce+lovasz")


def make_loss(name="dice"):
    """The training loss on logits: the paper's Dice (over the batch), Dice plus binary
    cross-entropy 1:1 (nnU-Net's default), the Lovasz hinge per image (a surrogate of each
    image's IoU, which is how ISIC scores), or the three summed 1:1:1."""
    import segmentation_models_pytorch as smp

    known = {"dice": smp.losses.DiceLoss("binary", from_logits=True),
             "bce": torch.nn.BCEWithLogitsLoss(),
             "lovasz": smp.losses.LovaszLoss("binary", per_image=True, from_logits=True)}
    if name not in LOSSES:
        raise SettingError(f"LOSS={name!r}: use one of {', '.join(LOSSES)}")
    terms = [known[part] for part in name.split("+")]
    if len(terms) == 1:
        return terms[0]
    return lambda logits, masks: sum(term(logits, masks) for term in terms)


# ----------------------------------------------------------------------------- deep supervision

# The FPN decoder's pyramid levels that get a head of their own: 1/32, 1/16 and 1/8 of the input
DEEP_LEVELS = ("p5", "p4", "p3")
# nnU-Net's weights: the output 1, each coarser level half the one before; normalised to sum 1
DEEP_WEIGHTS = (1.0, 0.5, 0.25, 0.125)
DEEP_KEY = "deep_supervision"  # the heads' module; its weights never enter a model file


def attach_deep_supervision(model):
    """Give an FPN a 1x1 head (features -> logits) on each of DEEP_LEVELS, as the submodule
    DEEP_KEY, and let those levels keep their output while the model trains, for
    DeepSupervisedLoss. The network's own output is unchanged."""
    decoder = getattr(model, "decoder", None)
    if not all(hasattr(decoder, name) for name in DEEP_LEVELS):
        raise SettingError("DEEP_SUPERVISION: only ARCH FPN has the pyramid levels "
                           f"{', '.join(DEEP_LEVELS)} it supervises")
    channels = decoder.p5.out_channels
    model.add_module(DEEP_KEY, torch.nn.ModuleList(
        torch.nn.Conv2d(channels, 1, kernel_size=1) for _ in DEEP_LEVELS))
    for name in DEEP_LEVELS:
        getattr(decoder, name).register_forward_hook(_keep_training_output)
    return model


def _keep_training_output(module, inputs, output):
    module.kept_output = output if module.training else None


class DeepSupervisedLoss:
    """The loss of the output, plus the same loss of each head of attach_deep_supervision on
    its level's features against the true mask shrunk to that level's size (area mean, then
    cut at 0.5), weighted by DEEP_WEIGHTS. In evaluation mode (validation) the output's loss
    alone."""

    def __init__(self, loss, model):
        self.loss, self.model = loss, model

    def __call__(self, logits, masks):
        main = self.loss(logits, masks)
        blocks = [getattr(self.model.decoder, name) for name in DEEP_LEVELS]
        kept = [getattr(b, "kept_output", None) for b in blocks]
        if not self.model.training or any(k is None for k in kept):
            return main
        total = DEEP_WEIGHTS[0] * main
        for weight, head, block, features in zip(DEEP_WEIGHTS[1:], getattr(self.model, DEEP_KEY),
                                                 blocks, kept):
            block.kept_output = None  # used once: no step holds the features of another
            aux = head(features.float())
            small = (torch.nn.functional.adaptive_avg_pool2d(masks, aux.shape[-2:]) >= 0.5)
            total = total + weight * self.loss(aux, small.float())
        return total / sum(DEEP_WEIGHTS)


def without_deep_supervision(state):
    """A model's state without the heads of attach_deep_supervision: what model files hold."""
    return {k: v for k, v in state.items() if not k.startswith(DEEP_KEY + ".")}
