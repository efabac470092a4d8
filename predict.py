"""Prediction: an image (or a loader's batch) -> lesion probability at the image's own size,
by a checkpoint or an ensemble of them (Predictor, PyTorch) or by a file of export_model.py
(OnnxPredictor, onnxruntime), with test-time views. Both give the same interface:
image(), batch(), describe(), name(), members, settings, ckpt.

ImageProbability is the one way from a uint8 image to its probability map (resize,
normalisation, networks over the views, sigmoid, means, resize back): Predictor runs it and
export_model.py traces it into the ONNX graph, so the two cannot drift apart."""
import json
from pathlib import Path

import numpy as np
import torch

import onnx_format
import preprocess
from checkpoint import (best_models, checkpoint_fields, input_settings,
                        is_resume_state, load_checkpoint, model_from_checkpoint)
from device import autocast, to_device
from settings import SettingError


def probabilities(model, images, device, mixed=False, channels_last=False):
    """(N, H, W) float32 lesion probabilities at network size for a (N, 3, H, W) batch."""
    return tta_probabilities(model, images, device, "none", mixed, channels_last)


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
    """Mean lesion probability over the test-time views of a batch at network size, mapped
    back to place (ImageProbability.network_probability)."""
    module = ImageProbability([model.eval()], [tuple(images.shape[-2:])], tta, channels_last)
    with autocast(device, mixed):
        return module.network_probability(0, to_device(images, device, False))


def load_model(path, compute):
    """(model in eval mode on the Compute's device, checkpoint dict) of a checkpoint file; in
    channels_last where the Compute uses it."""
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path).to(compute.device).eval()
    if compute.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, ckpt


def onnx_session(path, threads=None):
    """onnx_format.session with as many threads as torch uses (OMP_NUM_THREADS, which
    onnxruntime itself ignores)."""
    return onnx_format.session(path, threads or torch.get_num_threads())


def read_with_size(image_path, decode_hw, exif=True, hw=None):
    """(the image decoded at the reduced scale that still gives `decode_hw`, the size its map
    is made at: `hw`, or the image's own as its header gives it, turned as it is read)."""
    image = preprocess.read_image(image_path, min_hw=decode_hw, exif=exif)
    if hw is None:
        info = preprocess.image_info(image_path)
        hw = (info["height"], info["width"])
        if not exif and info["orientation"] in (5, 6, 7, 8):
            hw = hw[::-1]
    return image, hw


class OnnxPredictor:
    """An exported file run by onnxruntime's CPU provider, with the interface of Predictor.
    The graph does the resizing, views and mean itself: it is given each image as
    preprocess.read_image decodes it for the PyTorch path (a JPEG at reduced scale;
    grey, RGBA and 16-bit images converted alike) and returns the probability map at the
    image's own size."""

    def __init__(self, path, tta="none"):
        meta = onnx_format.read_metadata(path)
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
        return self.probability(*read_with_size(image_path, self.decode_hw, exif, hw))

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


def resize_image(x, size_hw):
    """(1, 3, H, W) float32 pixel values -> (1, 3, h, w), rounded to whole levels as a uint8
    image is: the linear filter widened to the shrink factor (antialias), which ONNX writes as
    one Resize node (antialias=1, exclude_outside=1) and onnxruntime computes as PyTorch does.
    It stands in for training's OpenCV area resize (docs/deployment.md gives the measured
    difference); when enlarging it is the plain linear resize, as OpenCV's."""
    small = torch.nn.functional.interpolate(x, size=tuple(size_hw), mode="bilinear",
                                            antialias=True, align_corners=False)
    return torch.round(small)


def resize_back(prob, out_hw):
    """(1, 1, h, w) -> (1, 1, H, W) linear with half-pixel centres (cv2.INTER_LINEAR's)."""
    return torch.nn.functional.interpolate(prob, size=tuple(out_hw), mode="bilinear",
                                           align_corners=False)


class ImageProbability(torch.nn.Module):
    """The one way from a uint8 image (H, W, 3) to its lesion probability (H, W) float32 at
    the image's own size (or at `out_hw`): each member's resize to its network size, its
    normalisation, the network over the test-time views, the sigmoid in float32, the mean
    over views and members, the linear resize back. Predictor runs it; export_model.py
    traces it to ONNX, so a new view or architecture exports with no code of its own."""

    def __init__(self, nets, settings, tta="none", channels_last=False):
        super().__init__()
        self.nets = torch.nn.ModuleList(nets)
        self.settings = [preprocess.as_settings(s) for s in settings]
        self.views = tta_views(tta, all(s.size_hw[0] == s.size_hw[1] for s in self.settings))
        self.channels_last = channels_last
        for i, s in enumerate(self.settings):  # constants of the graph, kept on the device
            scale = 255.0 * torch.tensor(s.std, dtype=torch.float32)
            self.register_buffer(f"shift{i}", (255.0 * torch.tensor(s.mean))[:, None, None],
                                 persistent=False)
            self.register_buffer(f"factor{i}", (1.0 / scale)[:, None, None], persistent=False)

    def network_probability(self, index, x):
        """(N, h, w) mean probability over the views of member `index` for its normalised
        (N, 3, h, w) input at network size."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # the views in one batch: one pass of the network (and one in the graph)
        views = torch.cat([forward(x) for forward, _ in self.views]) \
            if len(self.views) > 1 else self.views[0][0](x)
        probs = torch.sigmoid(self.nets[index](views).float())  # float32, not bfloat16
        parts = probs.split(x.shape[0])
        total = sum(inverse(part) for (_, inverse), part in zip(self.views, parts))
        return total[:, 0] / len(self.views)

    def normalised(self, index, pixels):
        """(1, 3, H, W) float pixels -> member `index`'s normalised input at its size."""
        small = resize_image(pixels, self.settings[index].size_hw)
        return (small - getattr(self, f"shift{index}")) * getattr(self, f"factor{index}")

    def forward(self, image, out_hw=None):
        out_hw = tuple(image.shape[:2]) if out_hw is None else tuple(out_hw)
        pixels = image.permute(2, 0, 1)[None].float()
        total = None
        for group in self.groups():
            # members of one input size: their mean commutes with the linear resize back
            probs = [self.network_probability(i, self.normalised(i, pixels)) for i in group]
            mean = sum(probs) / len(probs) if len(probs) > 1 else probs[0]
            # squeezed, not indexed: an index is a copy of the full-size map in ONNX
            part = resize_back(mean[:, None], out_hw).squeeze(1).squeeze(0)
            part = part * (len(group) / len(self.nets)) if len(group) < len(self.nets) else part
            total = part if total is None else total + part
        return total

    def groups(self):
        """Member indices grouped by input settings, in order of first appearance."""
        found = {}
        for i, s in enumerate(self.settings):
            found.setdefault(s, []).append(i)
        return list(found.values())


class Predictor:
    """One checkpoint, or an ensemble of several, with test-time views: the mean lesion
    probability over every member and view, each member with its own preprocessing, through
    the one ImageProbability module."""
    why = "given by --checkpoint"  # how the checkpoint was chosen, for the console

    def __init__(self, members, compute, tta="none"):
        self.members = list(members)  # [(model, checkpoint dict, path)]
        self.compute, self.device, self.tta = compute, compute.device, tta
        self.ckpt, self.path = self.members[0][1], self.members[0][2]
        self.settings = input_settings(self.ckpt)
        member_settings = [input_settings(c) for _, c, _ in self.members]
        self.module = ImageProbability([m for m, _, _ in self.members], member_settings, tta,
                                       compute.channels_last).to(compute.device).eval()
        # the decode scale must serve every member: the largest network side of each axis
        self.decode_hw = tuple(max(s.size_hw[i] for s in member_settings) for i in (0, 1))

    def name(self):
        return Path(self.path).name if len(self.members) == 1 else \
            f"ensemble of {len(self.members)} ({Path(self.path).parent})"

    def describe(self):
        return describe(self.members)

    @torch.inference_mode()
    def probability(self, image, hw=None):
        """(H, W) float32 numpy map of a decoded uint8 (H, W, 3) image, or at `hw`."""
        with autocast(self.device, self.compute.mixed):
            prob = self.module(torch.from_numpy(np.ascontiguousarray(image)).to(self.device),
                               hw)
        return prob.float().cpu().numpy()

    def image(self, image_path, exif=True, hw=None):
        """Probability map at the image's size as read (or at `hw`): a JPEG decoded at the
        reduced scale that still serves every member (preprocess.read_image), the map made
        at the size in its header."""
        return self.probability(*read_with_size(image_path, self.decode_hw, exif, hw))

    @torch.inference_mode()
    def batch(self, images, pairs):
        """A map per image of the loader's batch of `pairs` (already at the first member's
        network size, by training's resize), for preprocess.prob_to_original: the members'
        mean at network size when every member shares the first one's input settings (the
        mean and the linear resize commute), else a tuple of each member's map at its own
        size, averaged once each is resized to the original size."""
        per_member, shared = [], True
        for index, (_, ckpt, _) in enumerate(self.members):
            settings = input_settings(ckpt)
            shared = shared and settings == self.settings
            x = images if settings == self.settings else torch.cat(
                [preprocess.eval_input(p.image, settings, p.exif)[0] for p in pairs])
            with autocast(self.device, self.compute.mixed):
                probs = self.module.network_probability(index, x.to(self.device))
            per_member.append(probs.float().cpu().numpy())
        if shared:
            return list(np.mean(per_member, axis=0))
        return list(zip(*per_member))


def predict(model, ckpt, image_path, compute, exif=True, hw=None, tta="none"):
    """Probability map (float32) of one image by one checkpoint (Predictor.image)."""
    return Predictor([(model, ckpt, "checkpoint")], compute, tta).image(image_path, exif, hw)


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
