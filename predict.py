"""Prediction: an image (or a loader's batch) -> lesion probability at the image's own size,
by a checkpoint or an ensemble of them (Predictor, PyTorch) or by a file of export_model.py
(OnnxPredictor, onnxruntime), with test-time views. Both give the same interface:
image(), batch(), describe(), name(), members, settings, ckpt."""
import json
from pathlib import Path

import numpy as np
import torch

import preprocess
from checkpoint import (CheckpointError, best_models, checkpoint_fields, input_settings,
                        is_resume_state, load_checkpoint, model_from_checkpoint)
from device import autocast, to_device
from settings import SettingError


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


def load_model(path, compute):
    """(model in eval mode on the Compute's device, checkpoint dict) of a checkpoint file; in
    channels_last where the Compute uses it."""
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path).to(compute.device).eval()
    if compute.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, ckpt


ONNX_FORMAT = "melanoma-fpn-onnx"  # export_model.py's marker in the file's metadata
ONNX_VERSION = 2
# what test_model.py needs from an exported file's metadata
ONNX_KEYS = ("format", "version", "arch", "encoder", "network_size", "interpolation", "mean",
             "std", "threshold", "tta", "views", "recipe", "sources", "members", "opset")


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
            or int(meta["version"]) != ONNX_VERSION:
        raise CheckpointError(f"{path} has format {meta['format']!r} version "
                              f"{meta['version']!r}; this code reads {ONNX_FORMAT!r} version "
                              f"{ONNX_VERSION} only: export it again with `python export_model.py`")
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
    """An exported file run by onnxruntime's CPU provider, with the interface of Predictor.
    The graph does the resizing, views and mean itself: it is given each image as
    preprocess.read_image decodes it for the PyTorch path (a JPEG at reduced scale;
    grey, RGBA and 16-bit images converted alike) and returns the probability map at the
    image's own size."""

    def __init__(self, path, tta="none"):
        meta = onnx_metadata(path)
        if tta not in ("none", meta["tta"]):
            raise SettingError(f"TTA={tta!r}: {path} holds the test-time views "
                               f"{meta['tta']!r}; export again with `python export_model.py "
                               f"--tta {tta}`")
        self.path, self.meta, self.tta = Path(path), meta, meta["tta"]
        records = json.loads(meta["members"])  # each a checkpoint without its weights
        first = records[0]
        self.ckpt = dict(first, settings=dict(first["settings"],
                                              threshold=float(meta["threshold"])))
        self.members = [(None, record, self.path) for record in records]
        self.settings = input_settings(first)
        # the decode scale must serve every member: the largest network side of each axis
        self.decode_hw = tuple(max(r["settings"]["image_size"][i] for r in records)
                               for i in (0, 1))
        self.device = torch.device("cpu")
        self.session = onnx_session(path)

    why = "given by --checkpoint"  # how the file was chosen, for the console

    def name(self):
        return f"{self.path.name} (onnxruntime)"

    def describe(self):
        return describe(self.members)

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


class UsageError(ValueError):
    """A problem the user can fix; shown as one line."""


def find_checkpoint(model_dir):
    """(the default checkpoint, why it was picked): the newest best model under model_dir,
    one trained on real data before a demo model (resume states are never picked)."""
    found = [p for p in Path(model_dir).rglob("*.pth") if not is_resume_state(p)]
    if not found:
        raise UsageError(f"no checkpoint (*.pth) under {model_dir}/: train one first with "
                         f"`python train_model.py` (or `python train_model.py --demo`), "
                         f"or pass --checkpoint PATH")
    real = [p for p in found if not checkpoint_fields(p, ("demo",)).get("demo")]
    newest = max(real or found, key=lambda p: p.stat().st_mtime)
    why = (f"the newest of {len(found)} best model(s) under {model_dir}/"
           + ("" if real or len(found) == 1 else ", all of them demo models")
           + (", demo models left aside" if real and len(real) < len(found) else "")
           + "; --checkpoint picks another")
    return newest, why


def predict_batch(model, images, compute, tta="none"):
    """Probabilities (N, h, w) float32 numpy at network size for a (N, 3, H, W) batch."""
    return tta_probabilities(model, images, compute.device, tta, compute.mixed,
                             compute.channels_last).cpu().numpy()


def decoded_probability(members, image, compute, tta="none"):
    """(H, W) map of a decoded uint8 (H, W, 3) image by [(model, ckpt, path)]: each member's
    resize, network and views, its map resized to the image's size, the mean over members.
    The steps an exported graph holds, in PyTorch."""
    maps = []
    for model, ckpt, _ in members:
        settings = input_settings(ckpt)
        small, _ = preprocess.resize_pair(image, None, settings.size_hw, settings.interpolation)
        x = preprocess.to_tensor(small, settings.mean, settings.std)[None]
        maps.append(preprocess.prob_to_original(predict_batch(model, x, compute, tta)[0],
                                                image.shape[:2]))
    return maps[0] if len(maps) == 1 else np.mean(maps, axis=0)


def predict(model, ckpt, image_path, compute, exif=True, hw=None, tta="none"):
    """Probability map (float32) of one image at its size as read (or at `hw`)."""
    tensor, read_hw = preprocess.eval_input(image_path, input_settings(ckpt), exif=exif)
    return preprocess.prob_to_original(predict_batch(model, tensor, compute, tta)[0],
                                       hw or read_hw)


class Predictor:
    """One checkpoint, or an ensemble of several, with test-time views: the mean lesion
    probability over every member and view, each member with its own preprocessing."""
    why = "given by --checkpoint"  # how the checkpoint was chosen, for the console

    def __init__(self, members, compute, tta="none"):
        self.members = list(members)  # [(model, checkpoint dict, path)]
        self.compute, self.device, self.tta = compute, compute.device, tta
        self.ckpt, self.path = self.members[0][1], self.members[0][2]
        self.settings = input_settings(self.ckpt)

    def name(self):
        return Path(self.path).name if len(self.members) == 1 else \
            f"ensemble of {len(self.members)} ({Path(self.path).parent})"

    def describe(self):
        return describe(self.members)

    def batch(self, images, pairs):
        """A map per image of the loader's batch of `pairs`, for preprocess.prob_to_original:
        the members' mean at network size when every member shares the first one's input
        settings (the mean and the linear resize commute), else a tuple of each member's map
        at its own size, averaged once each is resized to the original size, as image() does."""
        per_member, shared = [], True
        for model, ckpt, _ in self.members:
            settings = input_settings(ckpt)
            shared = shared and settings == self.settings
            x = images if settings == self.settings else torch.cat(
                [preprocess.eval_input(p.image, settings, p.exif)[0] for p in pairs])
            per_member.append(predict_batch(model, x, self.compute, self.tta))
        if shared:
            return list(np.mean(per_member, axis=0))
        return list(zip(*per_member))

    def image(self, image_path, exif=True, hw=None):
        maps = [predict(model, ckpt, image_path, self.compute, exif, hw, self.tta)
                for model, ckpt, _ in self.members]
        return maps[0] if len(maps) == 1 else np.mean(maps, axis=0)


def load_predictor(paths, model_dir, compute, tta="none"):
    """A Predictor of the checkpoint files given (a folder: its best models), else the newest.
    An ONNX file of export_model.py runs through onnxruntime (OnnxPredictor)."""
    if any(str(p).lower().endswith(".onnx") for p in paths or []):
        if len(paths) > 1:
            raise UsageError("an ONNX file holds its whole ensemble: give it alone")
        return OnnxPredictor(paths[0], tta)
    files = []
    for path in map(Path, paths or []):
        files += best_models(path) if path.is_dir() else [path]
    if paths and not files:
        raise UsageError(f"no checkpoint (*.pth) in {' '.join(map(str, paths))}")
    why = "given by --checkpoint"
    if not files:
        newest, why = find_checkpoint(model_dir)
        files = [newest]
    members = [(*load_model(p, compute), p) for p in files]
    predictor = Predictor(members, compute, tta)
    predictor.why = why
    return predictor


def describe(members):
    """What a result names beside its scores: each model's file, network, size, epoch and the
    data it was trained on."""
    return {"models": [{"checkpoint": str(path), "arch": c["settings"]["arch"],
                        "encoder": c["settings"]["encoder"],
                        "image_size": list(c["settings"]["image_size"]),
                        "epoch": c.get("epoch"), "trained_on": c["settings"]["data"],
                        **({"exported_from": c["file"]} if "file" in c else {})}
                       for _, c, path in members]}
