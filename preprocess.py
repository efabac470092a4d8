"""Image -> tensor and back: the one place that knows the size rule, the normalisation,
the augmentation, the preprocessed cache, and how a file is written whole or not at all.

The cache is built ahead of training from the data scan: `python load_dataset.py --data data
--build-cache`.
"""
import hashlib
import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
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
INTERPOLATION = "area"  # images: area averaging to shrink, linear to enlarge; masks: nearest
INTERPOLATIONS = {"area": (cv2.INTER_AREA, cv2.INTER_LINEAR),
                  "linear": (cv2.INTER_LINEAR, cv2.INTER_LINEAR)}  # name -> (shrink, enlarge)
MAX_PIXELS = 150_000_000  # refuse larger declared sizes (ISIC's largest is about 30 MP)
CACHE_VERSION = 2  # bump when the cached arrays would change for the same settings



def before_fork():
    """Call before starting worker processes (loader workers, pools): OpenCV's thread pool does
    not survive a fork (a child that touches it waits forever on a lock of the parent's), so a
    process that forks runs OpenCV on one thread from then on; its workers are one per core
    anyway. A process that never forks (one image segmented) keeps OpenCV's own threads."""
    cv2.setNumThreads(1)


class ImageError(ValueError):
    """A file that cannot be used as an image or mask; the message names the file."""


@dataclass(frozen=True)
class InputSettings:
    """What shapes the network's input; saved in every checkpoint and read back by inference."""
    size_hw: tuple
    interpolation: str = INTERPOLATION
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD


# ---------------------------------------------------------------------------- writing files

@contextmanager
def atomic_write(path, durable=False):
    """Yield a temporary path beside `path`; on success it is renamed to `path`.

    A crash or Ctrl-C leaves the previous file intact and no half-written one under its name.
    `durable` also flushes the bytes and the rename to disk (checkpoints)."""
    path = Path(path)
    # checkpoints have one writer; a cache entry may be built by two loader workers at once
    tmp = path.with_name(f"{path.name}.tmp" if durable else f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except OSError as exc:  # a full disk, a removed folder: say where, keep the old file
        tmp.unlink(missing_ok=True)
        kept = f"; the previous {path.name} is unchanged" if path.exists() else ""
        raise OSError(f"could not write {path}: {exc.strerror or exc}{kept}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
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


def write_text(path, text):
    with atomic_write(path) as tmp:
        Path(tmp).write_text(text)


def write_bytes(path, data):
    with atomic_write(path) as tmp:
        Path(tmp).write_bytes(data)


def write_csv(path, rows, columns):
    """A table of dicts as CSV, written whole or not at all."""
    import csv
    import io

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, text.getvalue())


def save_figure(fig, path, dpi=90):
    """A matplotlib figure as PNG through the atomic writer, then closed."""
    import matplotlib.pyplot as plt

    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)


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

_PILLOW_LIMIT = threading.Lock()  # Pillow's bomb limit is lifted only while we read a header


def _open(path):
    """Open an image lazily and check what can be checked from its header (Pillow's own
    decompression-bomb limit stays as it is for every other use of Pillow)."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: empty file (0 bytes)")
        with _PILLOW_LIMIT:  # our own check below names the declared size
            limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                img = Image.open(path)  # the header only
            finally:
                Image.MAX_IMAGE_PIXELS = limit
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


def read_image(path, min_hw=None, notes=None, exif=True):
    """RGB uint8 array (H, W, 3), turned by its EXIF orientation unless `exif` is False.

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
        if orientation != 1 and exif:
            img = ImageOps.exif_transpose(img)
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


def stored_hw(path):
    """(height, width) of the pixels as stored, before any EXIF orientation (masks, PNGs)."""
    with _open(path) as img:
        return img.height, img.width


def same_aspect(a, b):
    """True when two (h, w) shapes have the same aspect ratio, to 1%."""
    return abs((a[1] / a[0]) / (b[1] / b[0]) - 1) <= 0.01


def pair_orientation(image_info_, mask_hw, image_path=None, mask_path=None):
    """(turn the image by its EXIF orientation?, a note or None), decided by the mask.

    The official scorer compares raw arrays and masks are never turned, so the mask decides:
    an image is turned when its mask has the turned shape (orientations 5 to 8 swap the
    axes). Where the shape cannot tell (flips, half turns, square images) and the files are
    given, the content decides (orientation_by_content); (None, note) then means that it
    could not, and the pair is not to be used. Without the files the stored pixels are kept,
    as the scorer would compare them."""
    o = image_info_["orientation"]
    if o == 1:
        return True, None
    turned = (image_info_["height"], image_info_["width"])
    stored = turned[::-1] if o in (5, 6, 7, 8) else turned
    fits_turned, fits_stored = same_aspect(mask_hw, turned), same_aspect(mask_hw, stored)
    if fits_turned and not fits_stored:
        return True, f"EXIF orientation {o} applied: its mask has the turned shape"
    if fits_stored and not fits_turned:
        return False, (f"EXIF orientation {o} not applied: its mask has the shape of the "
                       f"image as stored")
    if not fits_stored:
        return False, f"EXIF orientation {o} not applied"
    if image_path is not None and mask_path is not None:
        return orientation_by_content(image_path, mask_path, o)
    return False, (f"EXIF orientation {o} not applied: a flip, half turn or square image "
                   f"cannot be told from the mask's shape, so the stored pixels are used")


ORIENTATION_MARGIN = 8.0  # grey levels (of 255) by which one orientation must win


def lesion_contrast(image, mask):
    """Mean grey level outside the mask minus inside it: lesions are darker than skin."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    if grey.shape != mask.shape:
        grey = cv2.resize(grey, mask.shape[::-1], interpolation=cv2.INTER_AREA)
    inside = mask > 0
    return float(grey[~inside].mean() - grey[inside].mean())


def orientation_by_content(image_path, mask_path, orientation):
    """(turn by EXIF?, note) for a pair whose mask fits the image both ways: the way that puts
    the mask on the darker, lesion-like pixels, by at least ORIENTATION_MARGIN grey levels;
    (None, note) when neither wins by that much."""
    mask = read_mask(mask_path)
    if mask.min() == mask.max():  # an empty or full mask fits either way alike
        return False, (f"EXIF orientation {orientation} not applied: its mask is uniform, so "
                       f"the stored pixels are used")
    side = (max(mask.shape),) * 2
    turned = lesion_contrast(read_image(image_path, min_hw=side, exif=True), mask)
    stored = lesion_contrast(read_image(image_path, min_hw=side, exif=False), mask)
    figures = f"the lesion is {turned:.0f} grey levels darker turned, {stored:.0f} as stored"
    if abs(turned - stored) < ORIENTATION_MARGIN:
        return None, (f"EXIF orientation {orientation}: the mask fits the image both ways and "
                      f"its content cannot tell which ({figures})")
    if turned > stored:
        return True, f"EXIF orientation {orientation} applied, decided by content ({figures})"
    return False, f"EXIF orientation {orientation} not applied, decided by content ({figures})"


# ---------------------------------------------------------------------------- to network size

def resize_pair(image, mask, size_hw, interpolation=INTERPOLATION):
    """Image and mask resized to the network size; masks by nearest neighbour."""
    h, w = size_hw
    shrink_mode, enlarge_mode = INTERPOLATIONS[interpolation]
    shrink = image.shape[0] >= h and image.shape[1] >= w
    image = cv2.resize(image, (w, h), interpolation=shrink_mode if shrink else enlarge_mode)
    if mask is not None:
        if mask.shape[:2] != image.shape[:2]:
            mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    return image, mask


AUGMENTS = ("full", "flips")  # train_model.AUGMENT: how strongly training images are varied


def train_augment(size_hw, seed=None, strength="full"):
    """Random transforms for training only, applied alike to image and mask.

    Lesions have no up or down, so flips and 90-degree turns (square inputs) are free:
    "flips" stops there. "full" adds small affine moves and colour jitter for the spread of
    dermoscope lighting. Masks use nearest-neighbour interpolation."""
    if strength not in AUGMENTS:
        raise ValueError(f"augmentation {strength!r} is not one of {', '.join(AUGMENTS)}")
    h, w = size_hw
    transforms = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    if h == w:
        transforms.append(A.RandomRotate90(p=0.5))
    if strength == "full":
        transforms += [
            A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-20, 20),
                     interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                     border_mode=cv2.BORDER_REFLECT_101, p=0.5),
            A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.5),
            A.HueSaturationValue(hue_shift_limit=8, sat_shift_limit=15, val_shift_limit=10,
                                 p=0.5)]
    return A.Compose(transforms, seed=seed)


def to_tensor(image, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """uint8 RGB (H, W, 3) -> float32 tensor (3, H, W), normalised by mean and std (of 0..1)."""
    scale = np.float32(255)
    arr = (image.astype(np.float32) - np.float32(mean) * scale) * (
        np.float32(1) / (np.float32(std) * scale))
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def mask_to_tensor(mask):
    """uint8 0/1 (H, W) -> float32 tensor (1, H, W)."""
    return torch.from_numpy(mask.astype(np.float32)[None])


def as_settings(settings):
    """InputSettings from itself or from a bare (height, width) with the default rest."""
    return settings if isinstance(settings, InputSettings) else InputSettings(tuple(settings))


def eval_input(path, settings, exif=True):
    """Inference input: (1, 3, H, W) tensor at network size and the (h, w) of the image read."""
    settings = as_settings(settings)
    image = read_image(path, min_hw=settings.size_hw, exif=exif)
    # a reduced-scale JPEG decode is smaller than the file: its size comes from the header
    info = image_info(path)
    hw = (info["height"], info["width"])
    if not exif and info["orientation"] in (5, 6, 7, 8):
        hw = hw[::-1]
    return network_input(image, settings), hw


def network_input(image, settings):
    """(1, 3, H, W) normalised tensor at network size of a decoded uint8 (h, w, 3) image,
    resized as training resizes it."""
    settings = as_settings(settings)
    small, _ = resize_pair(image, None, settings.size_hw, settings.interpolation)
    return to_tensor(small, settings.mean, settings.std)[None]


# ---------------------------------------------------------------------------- the way back

def prob_to_original(prob, original_hw):
    """Probability map at network size -> float32 map at the original (h, w). A tuple of maps
    (an ensemble's members at their own sizes): the mean of each one resized."""
    if isinstance(prob, tuple):
        return np.mean([prob_to_original(p, original_hw) for p in prob], axis=0)
    if isinstance(prob, torch.Tensor):
        prob = prob.detach().float().cpu().numpy()
    h, w = original_hw
    return cv2.resize(np.asarray(prob, np.float32).squeeze(), (w, h),
                      interpolation=cv2.INTER_LINEAR)


def binarise(prob, threshold):
    """Lesion where prob >= threshold, as bool; float32 on both sides, so that every caller
    (validation, --evaluate, --threshold-analysis) cuts at the same value."""
    return prob >= np.float32(threshold)


def largest_region_filled(mask):
    """The largest connected lesion region of a bool mask, its holes filled (an ISIC ground
    truth is one filled region). An empty mask stays empty."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), 8)
    if count <= 1:
        return mask.astype(bool)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    region = (labels == largest).astype(np.uint8)
    # holes: background that does not touch the border; flood the border from outside
    outside = np.pad(region, 1)
    cv2.floodFill(outside, None, (0, 0), 2)
    return ((outside[1:-1, 1:-1] != 2) | (region > 0))


def pack_truth(truth):
    """A bool mask as (bits, (h, w)): an eighth of the bytes, for the cache and the loaders."""
    return np.packbits(truth.ravel()), tuple(truth.shape)


def unpack_truth(bits, hw):
    return np.unpackbits(bits, count=hw[0] * hw[1]).reshape(hw).astype(bool)


def process_map(fn, tasks, processes, chunksize, desc, unit, progress=True):
    """[fn(task) for task in tasks] in a pool of processes, with a bar. Forked (macOS cannot
    fork safely: spawned there). The pool is closed and joined, so that its exit has no live
    worker to SIGTERM: a SIGTERM handler the workers inherit may not turn that into an exit."""
    from multiprocessing import get_context
    from tqdm import tqdm

    before_fork()
    with get_context("spawn" if sys.platform == "darwin" else "fork").Pool(processes) as pool:
        results = list(tqdm(pool.imap(fn, tasks, chunksize=chunksize), total=len(tasks),
                            desc=desc, unit=unit, disable=not progress))
        pool.close()
        pool.join()
    return results


def ordered_map(fn, items, threads):
    """fn(*item) over items in threads, results in order, a bounded number in flight: resizing
    to full size and PNG encoding (GIL released) then overlap the model instead of waiting."""
    with ThreadPoolExecutor(max(1, threads)) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.submit(fn, *item))
            if len(pending) > 2 * max(1, threads):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ---------------------------------------------------------------------------- the cache

def _file_key(path):
    if path is None:
        return None
    st = Path(path).stat()
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


class PreprocessCache:
    """Decoded, corrected and resized pairs kept on disk as uint8 arrays, and the true masks at
    their own size as packed bits (for validation at original size).

    An entry is keyed by the source files (path, size, modification time) and by every
    setting that changes the result, so a changed file or setting is rebuilt, never served
    stale. Entries are small .npy files read on demand: nothing is held in memory."""

    def __init__(self, cache_dir, size_hw, interpolation=INTERPOLATION):
        self.size_hw = tuple(int(s) for s in size_hw)
        self.root = Path(cache_dir)
        self.dir = self.root / f"{self.size_hw[0]}x{self.size_hw[1]}"
        self.settings = {"version": CACHE_VERSION, "size": self.size_hw,
                         "image_interp": interpolation, "mask_interp": "nearest"}

    def _entry(self, folder, *key):
        digest = hashlib.sha1(json.dumps(key).encode()).hexdigest()
        return folder / digest[:2] / f"{digest}.npy"

    def path_for(self, image_path, mask_path, exif=True):
        return self._entry(self.dir, self.settings, _file_key(image_path), _file_key(mask_path),
                           bool(exif))

    def load(self, image_path, mask_path, exif=True):
        """(image uint8 HxWx3, mask uint8 HxW 0/1 or None) at the working size."""
        entry = self.path_for(image_path, mask_path, exif)
        try:
            stacked = np.load(entry)
            if stacked.shape != (*self.size_hw, 4) or stacked.dtype != np.uint8:
                raise ValueError("cache entry of another shape")
        except (FileNotFoundError, ValueError, OSError, EOFError):
            stacked = self._build(image_path, mask_path, entry, exif)
        image = stacked[..., :3]
        mask = stacked[..., 3] if mask_path is not None else None
        return image, mask

    def _build(self, image_path, mask_path, entry, exif):
        image = read_image(image_path, min_hw=self.size_hw, exif=exif)
        mask = read_mask(mask_path) if mask_path is not None else None
        image, mask = resize_pair(image, mask, self.size_hw, self.settings["image_interp"])
        if mask is None:
            mask = np.zeros(image.shape[:2], np.uint8)
        stacked = np.concatenate([image, mask[..., None]], axis=2)
        _save_npy(entry, stacked)
        return stacked

    def truth(self, mask_path):
        """(packed bits, (h, w)) of a true mask at its own size; decoded once, then read."""
        entry = self._entry(self.root / "truth", CACHE_VERSION, _file_key(mask_path))
        try:
            stored = np.load(entry)
            h, w = (int(v) for v in stored[:8].view(np.uint32))  # two uint32: 8 bytes
            bits = stored[8:]
            if bits.size != (h * w + 7) // 8:
                raise ValueError("truncated truth entry")
            return bits, (h, w)
        except (FileNotFoundError, ValueError, OSError, EOFError):
            bits, hw = pack_truth(read_mask(mask_path) > 0)
            header = np.array(hw, np.uint32).view(np.uint8)
            _save_npy(entry, np.concatenate([header, bits]))
            return bits, hw

    def _build_one(self, task):
        image_path, mask_path, exif = task
        try:
            self.load(image_path, mask_path, exif)
            if mask_path is not None:
                self.truth(mask_path)
            return None
        except (ImageError, OSError) as exc:
            return str(exc)

    def build(self, pairs, workers=None, progress=True):
        """Build every missing entry with a pool of processes; returns [(path, error)]."""
        todo = [(p.image, p.mask, p.exif) for p in pairs]
        results = process_map(self._build_one, todo, workers or os.cpu_count() or 1, 4,
                              "caching", "pair", progress)
        return [(image_path, err) for (image_path, _, _), err in zip(todo, results) if err]


def _save_npy(entry, array):
    entry.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(entry) as tmp, open(tmp, "wb") as f:  # np.save would add ".npy" to a name
        np.save(f, array)
