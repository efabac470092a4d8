"""Image -> tensor and back: the one place that knows the size rule, the normalisation,
the augmentation, and the preprocessed cache.

    python preprocess.py --data data --image-size 320 320    # build the cache ahead of training
"""
import argparse
import hashlib
import json
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would ask PyPI at import

import albumentations as A
import cv2
import numpy as np
import torch
from PIL import Image, ImageOps

# ImageNet statistics, written here because segmentation-models-pytorch's
# get_preprocessing_params asks the model hub for them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_PIXELS = 150_000_000  # refuse larger declared sizes (ISIC's largest is about 30 MP)
CACHE_VERSION = 1  # bump when the cached arrays would change for the same settings
IMAGE_SIZE = (320, 320)  # default working size (height, width) for `python preprocess.py`
ENCODER_DEPTH = 5  # default encoder depth for `python preprocess.py`

# PIL's own bomb check warns first and errors at twice the limit; we check the header ourselves.
Image.MAX_IMAGE_PIXELS = None
cv2.setNumThreads(1)  # loader workers are already one per core


class ImageError(ValueError):
    """A file that cannot be used as an image or mask; the message names the file."""


# ---------------------------------------------------------------------------- size rule

def permitted_size(size, depth=5):
    """Nearest (height, width) whose sides are multiples of 2**depth, the FPN's total stride.

    `size` is one int (a square) or a (height, width) pair."""
    if not isinstance(depth, int) or not 1 <= depth <= 5:
        raise ValueError(f"encoder depth must be an integer from 1 to 5, got {depth!r}")
    sides = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if len(sides) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in sides):
        raise ValueError(f"image size must be a positive int or (height, width), got {size!r}")
    step = 2 ** depth
    return tuple(max(step, int(round(s / step)) * step) for s in sides)


# ---------------------------------------------------------------------------- reading

def _open(path):
    """Open an image lazily and check what can be checked from its header."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: empty file (0 bytes)")
        img = Image.open(path)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except Exception as exc:  # PIL raises several types for non-images
        raise ImageError(f"{path}: not a readable image ({exc.__class__.__name__})") from None
    if img.width * img.height > MAX_PIXELS:
        raise ImageError(f"{path}: declared size {img.width}x{img.height} exceeds "
                         f"{MAX_PIXELS:,} pixels (possible decompression bomb); refused")
    return img


def _orientation(img):
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:
        return 1


def image_info(path):
    """Header facts without decoding: size after EXIF orientation, mode, format, orientation."""
    with _open(path) as img:
        orientation = _orientation(img)
        w, h = img.size
        if orientation in (5, 6, 7, 8):  # these orientations swap the axes
            w, h = h, w
        return {"width": w, "height": h, "mode": img.mode, "format": img.format,
                "orientation": orientation}


def _decode(img, path):
    try:
        img.load()
    except Exception as exc:
        raise ImageError(f"{path}: truncated or corrupt image data ({exc})") from None


def read_image(path, min_hw=None, notes=None):
    """RGB uint8 array (H, W, 3) with the EXIF orientation applied.

    With `min_hw`, a JPEG is decoded at a reduced scale (1/2, 1/4, 1/8) whose sides stay at
    least `min_hw`: a 6000x4000 JPEG decodes several times faster that way. `notes`, when a
    list, receives a short line for each correction made."""
    notes = [] if notes is None else notes
    with _open(path) as img:
        orientation = _orientation(img)
        if min_hw is not None and img.format == "JPEG":
            side = max(min_hw)  # the orientation may swap the axes, so ask for the larger side
            img.draft("RGB", (side, side))
        _decode(img, path)
        if orientation != 1:
            img = ImageOps.exif_transpose(img)
            notes.append(f"EXIF orientation {orientation} applied")
        mode = img.mode
        if mode == "RGB":
            return np.asarray(img).copy()
        if mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img).astype(np.float32)
            top = 65535.0 if arr.max(initial=0) > 255 or mode.startswith("I;16") else 255.0
            arr = np.clip(arr * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
            notes.append("16-bit scaled to 8-bit, grayscale converted to RGB")
            return np.repeat(arr[..., None], 3, axis=2)
        if mode in ("L", "1", "LA"):
            notes.append("grayscale converted to RGB")
        elif mode in ("RGBA", "PA"):
            notes.append("alpha channel dropped")
        elif mode == "CMYK":
            notes.append("CMYK converted to RGB")
        elif mode == "P":
            notes.append("palette image converted to RGB")
        else:
            notes.append(f"{mode} converted to RGB")
        return np.asarray(img.convert("RGB")).copy()


def read_mask(path, notes=None):
    """Mask as uint8 (H, W) with values 0 (background) and 1 (lesion).

    RGB(A) masks are reduced to one channel; 0/1 masks are accepted; other values, as JPEG
    compression leaves them, are binarised at > 128 as the official ISIC scorer does."""
    notes = [] if notes is None else notes
    with _open(path) as img:
        _decode(img, path)
        mode = img.mode
        if mode in ("RGB", "RGBA", "LA", "P", "CMYK"):
            notes.append(f"{mode} mask reduced to one channel")
            img = img.convert("L")
        arr = np.asarray(img)
    if arr.dtype != np.uint8:  # 16-bit or 32-bit masks
        top = arr.max(initial=0)
        arr = (arr > (top / 2 if top > 1 else 0)).astype(np.uint8) * 255
        notes.append("16-bit mask reduced to 8-bit")
    counts = np.bincount(arr.ravel(), minlength=256)  # far faster than np.unique on 24 MP
    values = np.flatnonzero(counts)
    if values.size and values.max() <= 1:
        if values.max() == 1:
            notes.append("0/1 mask")
        return arr.copy()
    if not np.isin(values, (0, 255)).all():
        notes.append("values other than 0/255 binarised at > 128")
    return (arr > 128).astype(np.uint8)


# ---------------------------------------------------------------------------- to network size

def resize_pair(image, mask, size_hw):
    """Image and mask resized to the network size; area averaging to shrink, nearest for masks."""
    h, w = size_hw
    shrink = image.shape[0] >= h and image.shape[1] >= w
    image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    if mask is not None:
        if mask.shape[:2] != image.shape[:2]:
            mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    return image, mask


def train_augment(size_hw, seed=None):
    """Random transforms for training only, applied alike to image and mask.

    Lesions have no up or down, so flips and rotations are free; the colour jitter covers
    the spread of dermoscope lighting. Masks use nearest-neighbour interpolation."""
    h, w = size_hw
    geometric = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    if h == w:
        geometric.append(A.RandomRotate90(p=0.5))
    return A.Compose(geometric + [
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-20, 20),
                 interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                 border_mode=cv2.BORDER_REFLECT_101, p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
        A.HueSaturationValue(hue_shift_limit=8, sat_shift_limit=15, val_shift_limit=10, p=0.5),
    ], seed=seed)


_MEAN = np.array(IMAGENET_MEAN, np.float32) * 255
_INV_STD = 1.0 / (np.array(IMAGENET_STD, np.float32) * 255)


def to_tensor(image):
    """uint8 RGB (H, W, 3) -> normalised float32 tensor (3, H, W)."""
    arr = (image.astype(np.float32) - _MEAN) * _INV_STD
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def mask_to_tensor(mask):
    """uint8 0/1 (H, W) -> float32 tensor (1, H, W)."""
    return torch.from_numpy(mask.astype(np.float32)[None])


def eval_input(path, size_hw):
    """Inference input: (1, 3, H, W) tensor at network size and the image's original (h, w)."""
    info = image_info(path)
    image = read_image(path, min_hw=size_hw)
    small, _ = resize_pair(image, None, size_hw)
    return to_tensor(small)[None], (info["height"], info["width"])


# ---------------------------------------------------------------------------- the way back

def to_original(prob, original_hw, threshold=0.5):
    """Probability map at network size -> 0/255 uint8 mask at the original (h, w)."""
    if isinstance(prob, torch.Tensor):
        prob = prob.detach().float().cpu().numpy()
    prob = np.asarray(prob, np.float32).squeeze()
    h, w = original_hw
    big = cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.where(big >= threshold, 255, 0).astype(np.uint8)


def prob_to_original(prob, original_hw):
    """Probability map at network size -> float32 map at the original (h, w)."""
    if isinstance(prob, torch.Tensor):
        prob = prob.detach().float().cpu().numpy()
    h, w = original_hw
    return cv2.resize(np.asarray(prob, np.float32).squeeze(), (w, h),
                      interpolation=cv2.INTER_LINEAR)


# ---------------------------------------------------------------------------- the cache

def _file_key(path):
    if path is None:
        return None
    st = Path(path).stat()
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


class PreprocessCache:
    """Decoded, corrected and resized pairs kept on disk as uint8 arrays.

    An entry is keyed by the source files (path, size, modification time) and by every
    setting that changes the result, so a changed file or setting is rebuilt, never served
    stale. Entries are small .npy files read on demand: nothing is held in memory."""

    def __init__(self, cache_dir, size_hw, depth=5):
        self.size_hw = tuple(int(s) for s in size_hw)
        self.depth = int(depth)
        self.dir = Path(cache_dir) / f"{self.size_hw[0]}x{self.size_hw[1]}"
        self.settings = {"version": CACHE_VERSION, "size": self.size_hw, "depth": self.depth,
                         "image_interp": "area|linear", "mask_interp": "nearest"}

    def path_for(self, image_path, mask_path):
        key = json.dumps([self.settings, _file_key(image_path), _file_key(mask_path)])
        digest = hashlib.sha1(key.encode()).hexdigest()
        return self.dir / digest[:2] / f"{digest}.npy"

    def load(self, image_path, mask_path):
        """(image uint8 HxWx3, mask uint8 HxW 0/1 or None) at the working size."""
        entry = self.path_for(image_path, mask_path)
        try:
            stacked = np.load(entry)
            if stacked.shape != (*self.size_hw, 4) or stacked.dtype != np.uint8:
                raise ValueError("cache entry of another shape")
        except (FileNotFoundError, ValueError, OSError, EOFError):
            stacked = self._build(image_path, mask_path, entry)
        image = stacked[..., :3]
        mask = stacked[..., 3] if mask_path is not None else None
        return image, mask

    def _build(self, image_path, mask_path, entry):
        image = read_image(image_path, min_hw=self.size_hw)
        mask = read_mask(mask_path) if mask_path is not None else None
        image, mask = resize_pair(image, mask, self.size_hw)
        if mask is None:
            mask = np.zeros(image.shape[:2], np.uint8)
        stacked = np.concatenate([image, mask[..., None]], axis=2)
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f"{entry.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, stacked)
        os.replace(tmp, entry)  # a crash mid-write never leaves a half entry
        return stacked

    def _build_one(self, pair):
        try:
            self.load(pair[0], pair[1])
            return None
        except (ImageError, OSError) as exc:
            return str(exc)

    def build(self, pairs, workers=None, progress=True):
        """Build every missing entry with a pool of processes; returns [(path, error)]."""
        from multiprocessing import get_context
        from tqdm import tqdm

        todo = [(p.image, p.mask) for p in pairs]
        workers = workers or os.cpu_count() or 1
        errors = []
        with get_context("spawn" if sys.platform == "darwin" else "fork").Pool(workers) as pool:
            results = pool.imap(self._build_one, todo, chunksize=4)
            for (image_path, _), err in tqdm(zip(todo, results), total=len(todo),
                                             desc="caching", disable=not progress):
                if err:
                    errors.append((image_path, err))
        return errors


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build the preprocessed cache ahead of training.")
    parser.add_argument("--data", default="data", help="data folder (default: %(default)s)")
    parser.add_argument("--image-size", type=int, nargs=2, default=IMAGE_SIZE, metavar=("H", "W"))
    parser.add_argument("--depth", type=int, default=ENCODER_DEPTH, help="encoder depth")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)

    import load_dataset

    size = tuple(args.image_size)
    if permitted_size(size, args.depth) != size:
        sys.exit(f"--image-size {size} breaks the size rule: each side must be a multiple of "
                 f"{2 ** args.depth}; nearest: {permitted_size(size, args.depth)}")
    found = load_dataset.scan(args.data)
    pairs = [p for split in found.splits.values() for p in split]
    if not pairs:
        sys.exit(load_dataset.no_data_message(args.data))
    cache = PreprocessCache(load_dataset.work_dir(args.data) / ".cache", size, args.depth)
    errors = cache.build(pairs, workers=args.workers)
    for path, err in errors:
        warnings.warn(f"skipped {path}: {err}")
    print(f"cache: {len(pairs) - len(errors)} pairs at {size[0]}x{size[1]} in {cache.dir}")


if __name__ == "__main__":
    main()
