"""Finding image/mask pairs on disk (ISIC layouts), checking and correcting them, the
train/valid/test split, the Dataset, and the generated demo data.

    python load_dataset.py --data data      # layout found, pairs per split, corrected/skipped files
    python load_dataset.py --make-demo      # write generated demo pairs to data/demo
"""
import argparse
import hashlib
import json
import os
import random
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from preprocess import (ImageError, image_info, mask_to_tensor, read_image, read_mask,
                        resize_pair, to_tensor, train_augment)

DATA_DIR = "data"  # default data folder
DEMO_DIR = "data/demo"  # where --make-demo writes by default
DEMO_COUNT = 240  # generated pairs in the demo set
DEMO_SEED = 0  # seed of the demo generator
SEED = 42  # seed of the drawn train/valid/test split
VALID_FRACTION = 0.1  # share of training pairs drawn for validation when there is no official set
TEST_FRACTION = 0.1  # share drawn for test when there is no official test set
MIN_SIDE = 32  # images smaller than this on either side are skipped (FPN's total stride)
POOL_MIN_FILES = 64  # fewer files than this are checked in-process (a pool costs more to start)
CHECK_VERSION = 1  # bump when the checks change, so cached results are not reused
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
DEMO_MARKER = "demo.json"  # written at the top of a demo tree; marks it as generated

# Official ISIC folder names: (pattern, layout, year, role); group 1 of the pattern is the split.
ISIC_FOLDERS = [
    (r"ISIC2018_Task1-2_(Training|Validation|Test)_Input", "ISIC 2018 Task 1", 2018, "image"),
    (r"ISIC2018_Task1_(Training|Validation|Test)_GroundTruth", "ISIC 2018 Task 1", 2018, "mask"),
    (r"ISIC-2017_(Training|Validation|Test_v2)_Data", "ISIC 2017 Part 1", 2017, "image"),
    (r"ISIC-2017_(Training|Validation|Test_v2)_Part1_GroundTruth", "ISIC 2017 Part 1", 2017,
     "mask"),
    (r"ISBI2016_ISIC_Part1_(Training|Test)_Data", "ISIC 2016 Part 1", 2016, "image"),
    (r"ISBI2016_ISIC_Part1_(Training|Test)_GroundTruth", "ISIC 2016 Part 1", 2016, "mask"),
]
SPLIT_OF = {"training": "train", "validation": "valid", "test": "test", "test_v2": "test"}
SPLIT_RANK = {"test": 0, "valid": 1, "train": 2}  # which copy of a duplicated id is kept
MASK_FOLDER = re.compile(r"mask|ground.?truth|label|annotation|segmentation|^gt$", re.I)
MASK_SUFFIX = re.compile(r"_(segmentation|mask)$", re.I)
ISIC_ID = re.compile(r"ISIC_\d{7}")


@dataclass(frozen=True)
class Pair:
    id: str
    image: Path
    mask: Path | None = None


@dataclass
class ScanResult:
    root: Path
    layout: str
    splits: dict = field(default_factory=dict)  # official split name -> [Pair] sorted by id
    corrected: list = field(default_factory=list)  # [(path, what was corrected)]
    skipped: list = field(default_factory=list)  # [(path, why)]

    def pair_count(self):
        return sum(len(pairs) for pairs in self.splits.values())

    def summary(self):
        counts = ", ".join(f"{s} {len(self.splits[s])}" for s in ("train", "valid", "test")
                           if s in self.splits)
        lines = [f"Data folder: {self.root}", f"Layout: {self.layout}",
                 f"Pairs found: {counts or 'none'}"]
        for title, entries in (("Corrected", self.corrected), ("Skipped", self.skipped)):
            if entries:
                lines.append(f"{title} {len(entries)} file(s):")
                lines += [f"  {os.path.relpath(path, self.root)}: "
                          f"{why.replace(f'{self.root}{os.sep}', '')}" for path, why in entries]
        return "\n".join(lines)


class SplitMismatch(ValueError):
    """The saved split names ids that are not on disk, or misses pairs that are."""


# ---------------------------------------------------------------------------- finding files

def _isic_folder(folder_names):
    """(layout, year, split, role) of the deepest official ISIC folder among the names, or None."""
    for name in reversed(folder_names):
        for pattern, layout, year, role in ISIC_FOLDERS:
            match = re.fullmatch(pattern, name, re.I)
            if match:
                return layout, year, SPLIT_OF[match.group(1).lower()], role
    return None


def _file_id(stem):
    match = ISIC_ID.search(stem)
    return match.group(0) if match else MASK_SUFFIX.sub("", stem)


def _classify(path, root):
    """Group key, description and role of one candidate file; pairs are matched within a group."""
    rel_dirs = [root.name] + list(path.parent.relative_to(root).parts)
    isic = _isic_folder(rel_dirs)
    if isic:
        layout, year, split, role = isic
        return (year, split), {"layout": layout, "year": year, "split": split}, role
    folder = path.parent
    in_mask_folder = folder != root and MASK_FOLDER.search(folder.name)
    role = "mask" if in_mask_folder or MASK_SUFFIX.search(path.stem) else "image"
    # an images/ folder and its masks/ sibling share a parent, which keys the group
    return ("plain", str(folder.parent)), {"layout": "plain", "year": 0, "split": "train"}, role


def _find_files(root, skipped):
    """Candidate image and mask files under root, with hidden, cache and metadata files left out."""
    found, demo_dirs = [], []

    def unreadable(err):
        skipped.append((Path(err.filename), f"folder not readable ({err.strerror})"))

    for folder, dirs, files in os.walk(root, onerror=unreadable):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__MACOSX")
        folder = Path(folder)
        if folder != root and DEMO_MARKER in files:
            demo_dirs.append(folder)
        for name in sorted(files):
            path = folder / name
            if (name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS
                    or path.stem.lower().endswith("_superpixels")):
                continue
            found.append(path)
    # a demo set below the data folder would mix generated images into the real splits, or
    # pass for real data when there is none: it is used only when scanned on its own
    for d in demo_dirs:
        skipped.append((d, "generated demo data, left out (scan it alone with --data)"))
    return [p for p in found if not any(d in p.parents for d in demo_dirs)]


# ---------------------------------------------------------------------------- checking files

_IMAGE_MAGIC = (b"\xff\xd8", b"\x89PNG", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")


def _looks_like_text(path):
    with open(path, "rb") as fh:
        head = fh.read(512)
    try:
        return not head.startswith(_IMAGE_MAGIC) and b"\x00" not in head and bool(head.decode())
    except UnicodeDecodeError:
        return False


def _reason(err, path):
    """The message of an error without the path it starts with (the report names the path)."""
    message = str(err).replace(f"{path}: ", "").replace(str(path), "").strip(" :")
    return message or type(err).__name__


def check_file(task):
    """(path, role) -> {"error", "notes", "hw"}; decodes the whole file. Runs in pool workers."""
    path, role = task
    try:
        if os.path.getsize(path) == 0:
            return {"error": "zero-byte file"}
        if _looks_like_text(path):
            return {"error": f"text file with an image extension ({Path(path).suffix})"}
        notes = []
        if role == "image":
            info = image_info(path)
            # a reduced-scale JPEG decode still reads every byte, so truncation is caught
            read_image(path, min_hw=(MIN_SIDE, MIN_SIDE), notes=notes)
            return {"error": None, "notes": notes, "hw": [info["height"], info["width"]]}
        mask = read_mask(path, notes=notes)
        return {"error": None, "notes": notes, "hw": list(mask.shape[:2])}
    except ImageError as err:
        return {"error": f"unreadable {role}: {_reason(err, path)}"}
    except Exception as err:  # one odd file must never stop a scan of thousands
        return {"error": f"unreadable {role}: {type(err).__name__}: {_reason(err, path)}"}


def _run_checks(tasks):
    processes = os.cpu_count() or 1
    if len(tasks) < POOL_MIN_FILES or processes == 1:
        return [check_file(t) for t in tasks]
    from multiprocessing import get_context
    from tqdm import tqdm
    chunk = max(1, min(32, len(tasks) // (processes * 8)))
    # fork as preprocess.PreprocessCache.build does; macOS cannot fork safely
    with get_context("spawn" if sys.platform == "darwin" else "fork").Pool(processes) as pool:
        results = pool.imap(check_file, tasks, chunksize=chunk)
        return list(tqdm(results, total=len(tasks), desc="checking files", unit="file"))


def _check_all(tasks, cache_file):
    """Check results per path, memoised in cache_file by (path, size, mtime) for a quick rescan."""
    try:
        cache = json.loads(cache_file.read_text())
        entries = cache["entries"] if cache.get("version") == CHECK_VERSION else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        entries = {}
    keys, results = {}, {}
    for path, role in tasks:
        try:
            st = os.stat(path)
            keys[path] = f"{role}|{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}"
        except OSError as err:
            results[path] = {"error": f"cannot read file ({err.strerror})"}
    todo = [(p, r) for p, r in tasks if p in keys and keys[p] not in entries]
    for (path, _), result in zip(todo, _run_checks([(str(p), r) for p, r in todo])):
        entries[keys[path]] = result
    results.update({path: entries[key] for path, key in keys.items()})
    if todo:
        fresh = {key: entries[key] for key in keys.values()}  # forget files no longer there
        try:
            _write_json(cache_file, {"version": CHECK_VERSION, "entries": fresh})
        except OSError:
            pass  # a cache we cannot write only costs time on the next scan
    return results


# ---------------------------------------------------------------------------- scan

def _pick(paths, checks, role, min_side, result):
    """First usable file among copies with one id; the others are reported."""
    kept = None
    for path in paths:
        check = checks.get(path, {"error": None, "notes": []})
        if check["error"]:
            result.skipped.append((path, check["error"]))
        elif role == "image" and min(check.get("hw") or [min_side]) < min_side:
            h, w = check["hw"]
            result.skipped.append((path, f"image {w}x{h} is smaller than {min_side} px"))
        elif kept is None:
            kept = path
        else:
            result.skipped.append((path, f"duplicate of {kept}"))
    return kept


def _size_problem(image_hw, mask_hw):
    """None when sizes agree; ("corrected"|"skipped", reason) otherwise."""
    if not image_hw or not mask_hw or list(image_hw) == list(mask_hw):
        return None
    (ih, iw), (mh, mw) = image_hw, mask_hw
    sizes = f"mask {mw}x{mh} differs from its image {iw}x{ih}"
    if abs((mw / mh) / (iw / ih) - 1) <= 0.01:
        return "corrected", f"{sizes}, same aspect ratio: resized (nearest) at load time"
    return "skipped", f"{sizes} in aspect ratio"


def _pair_group(info, checks, min_side, result):
    """Usable pairs of one group, reporting unmatched and unusable files."""
    images, masks, pairs = info["image"], info["mask"], []
    for role, files, other in (("image", images, masks), ("mask", masks, images)):
        lonely = sorted(p for i, ps in files.items() if i not in other for p in ps)
        if lonely and not other:  # a whole folder without its partner: one line, not thousands
            folders = sorted({str(p.parent) for p in lonely})
            partner = "masks" if role == "image" else "images"
            result.skipped += [(Path(f), f"{role}s without {partner} (no matching {partner} "
                                         f"folder found)") for f in folders]
        else:
            result.skipped += [(p, f"{role} without {'mask' if role == 'image' else 'image'}")
                               for p in lonely]
    for pair_id in sorted(set(images) & set(masks)):
        image = _pick(images[pair_id], checks, "image", min_side, result)
        mask = _pick(masks[pair_id], checks, "mask", min_side, result)
        problem = image and mask and _size_problem(checks.get(image, {}).get("hw"),
                                                   checks.get(mask, {}).get("hw"))
        if problem and problem[0] == "skipped":
            result.skipped += [(mask, problem[1]), (image, f"its mask {mask.name} is unusable")]
        elif image and not mask:
            result.skipped.append((image, f"its mask {masks[pair_id][0].name} is unusable"))
        elif mask and not image:
            result.skipped.append((mask, f"its image {images[pair_id][0].name} is unusable"))
        elif image and mask:
            pairs.append((Pair(pair_id, image, mask), problem))
    return pairs


def scan(root, min_side=MIN_SIDE, check=True):
    """Pairs per official split, and every file corrected or skipped with the reason."""
    root = Path(root).expanduser().absolute()
    result = ScanResult(root=root, layout="nothing recognised")
    if not root.is_dir():
        result.layout = "no such folder"
        return result
    groups = {}
    for path in _find_files(root, result.skipped):
        key, info, role = _classify(path, root)
        group = groups.setdefault(key, {**info, "image": {}, "mask": {}, "folders": {}})
        group[role].setdefault(_file_id(path.stem), []).append(path)
        group["folders"].setdefault(role, path.parent.name)
    # only files with a partner are decoded; the others are reported without opening them
    tasks = [(p, role) for g in groups.values()
             for role, other in (("image", "mask"), ("mask", "image"))
             for i, paths in g[role].items() if i in g[other] for p in paths]
    checks = _check_all(tasks, work_dir(root) / "scan_cache.json") if check and tasks else {}

    candidates = []
    for group in groups.values():
        candidates += [(group, pair, problem) for pair, problem in
                       _pair_group(group, checks, min_side, result)]
    # the newest year's official valid/test sets are held out; everything else trains
    held_out = {}
    for group, _, _ in candidates:
        if group["split"] != "train" and group["year"] > held_out.get(group["split"], 0):
            held_out[group["split"]] = group["year"]
    placed = [(g["split"] if held_out.get(g["split"]) == g["year"] else "train", g, pair, problem)
              for g, pair, problem in candidates]
    placed.sort(key=lambda c: (SPLIT_RANK[c[0]], -c[1]["year"], str(c[2].image)))
    kept = {}
    for split, _, pair, problem in placed:
        if pair.id in kept:
            result.skipped.append((pair.image, f"duplicate of {kept[pair.id].image}"))
            continue
        kept[pair.id] = pair
        result.splits.setdefault(split, []).append(pair)
        for path in (pair.image, pair.mask):
            if checks.get(path, {}).get("notes"):
                result.corrected.append((path, ", ".join(checks[path]["notes"])))
        if problem:
            result.corrected.append((pair.mask, problem[1]))
    for split in result.splits:
        result.splits[split].sort(key=lambda p: p.id)
    result.corrected.sort(key=lambda e: str(e[0]))
    result.skipped.sort(key=lambda e: str(e[0]))
    result.layout = _layout_name(groups) or result.layout
    return result


def _layout_name(groups):
    isic = sorted({(g["year"], g["layout"]) for g in groups.values() if g["year"]})
    plain = sorted({f"plain {g['folders'].get('image', '?')}/ + {g['folders'].get('mask', '?')}/"
                    for g in groups.values() if not g["year"]})
    return " + ".join([name for _, name in isic] + plain)


# ---------------------------------------------------------------------------- split

def _writable(folder):
    """True when we may write in folder; read-only permission bits count even for root."""
    try:
        if not folder.is_dir() or not folder.stat().st_mode & 0o222:
            return False
        with tempfile.TemporaryFile(dir=folder):  # catches read-only mounts too
            return True
    except OSError:
        return False


def work_dir(data_root):
    """Where the split file and caches of a data folder live: beside the data when writable."""
    root = Path(data_root).expanduser().absolute()
    if _writable(root):
        return root
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:12]
    folder = Path.home() / ".cache" / "melanoma-seg" / digest
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _write_json(path, obj):
    """Write through a temporary file so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _draw(ids, missing, seed, valid_fraction, test_fraction):
    ids = sorted(ids)  # the order on disk must not change the draw
    random.Random(seed).shuffle(ids)
    total, drawn = len(ids), {}
    for split, fraction in (("test", test_fraction), ("valid", valid_fraction)):
        if split in missing:
            n = max(1, round(total * fraction)) if total >= 3 else 0
            n = min(n, len(ids) - 1)  # training keeps at least one pair
            drawn[split], ids = sorted(ids[:n]), ids[n:]
    drawn["train"] = sorted(ids)
    return drawn


def split_pairs(scan_result, seed=SEED, valid_fraction=VALID_FRACTION,
                test_fraction=TEST_FRACTION, split_file=None):
    """train/valid/test pairs: official sets where present, else drawn once and saved."""
    official = scan_result.splits
    train = {p.id: p for p in official.get("train", [])}
    missing = [s for s in ("valid", "test") if not official.get(s)]
    if not missing or not train:
        return {s: list(official.get(s, [])) for s in ("train", "valid", "test")}
    split_file = Path(split_file) if split_file else work_dir(scan_result.root) / "split.json"
    if split_file.exists():
        ids, saved = _read_split(split_file, train, missing)
        if [saved.get("seed"), saved.get("valid_fraction"), saved.get("test_fraction")] != \
                [seed, valid_fraction, test_fraction]:
            warnings.warn(f"using the split saved in {split_file} (seed {saved.get('seed')}); "
                          f"delete it to draw one with seed {seed}")
    else:
        ids = _draw(train, missing, seed, valid_fraction, test_fraction)
        _write_json(split_file, {"seed": seed, "valid_fraction": valid_fraction,
                                 "test_fraction": test_fraction, "drawn": missing, "ids": ids})
    splits = {s: [train[i] for i in ids[s]] for s in ids}
    for s in ("valid", "test"):
        if s not in missing:
            splits[s] = list(official[s])
    return splits


def _read_split(split_file, train, missing):
    redraw = f"delete {split_file} or pass --redraw-split to train_model.py to draw a new split"
    try:
        saved = json.loads(split_file.read_text())
        ids = {s: list(saved["ids"][s]) for s in ["train"] + missing}
        drawn = sorted(saved["drawn"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SplitMismatch(f"{split_file}: unreadable split file ({err}); {redraw}") from None
    if drawn != sorted(missing):
        raise SplitMismatch(f"{split_file} drew {'+'.join(drawn) or 'nothing'} but the data now "
                            f"lacks {'+'.join(missing)} as official sets; {redraw}")
    saved_ids = {i for s in ids.values() for i in s}
    gone, new = saved_ids - set(train), set(train) - saved_ids
    if gone or new:
        raise SplitMismatch(f"{split_file} does not match the data: {len(gone)} saved id(s) no "
                            f"longer on disk, {len(new)} pair(s) on disk not in it; {redraw}")
    return ids, saved


# ---------------------------------------------------------------------------- Dataset

class SegmentationDataset(Dataset):
    """(image float32 3xHxW normalised, mask float32 1xHxW 0/1, id) per pair."""

    def __init__(self, pairs, size_hw, augment=False, cache=None, seed=0):
        self.pairs = list(pairs)
        self.size_hw = tuple(size_hw)
        self.cache = cache
        self.augment = train_augment(self.size_hw, seed=seed) if augment else None

    def __len__(self):
        return len(self.pairs)

    def set_epoch_seed(self, seed):
        """Reseed augmentation when loading in the main process (DataLoader workers=0)."""
        if self.augment is not None:
            self.augment.set_random_seed(seed)

    def __getitem__(self, i):
        pair = self.pairs[i]
        try:
            if self.cache is not None:
                image, mask = self.cache.load(pair.image, pair.mask)
            else:
                image = read_image(pair.image, min_hw=self.size_hw)
                mask = read_mask(pair.mask) if pair.mask else None
                image, mask = resize_pair(image, mask, self.size_hw)
        except (ImageError, OSError) as err:  # the file changed after the scan
            named = [p for p in (pair.image, pair.mask) if p and str(p) in str(err)]
            path = named[0] if named else getattr(err, "filename", None) or pair.image
            warnings.warn(f"skipping {path}: {_reason(err, path)}")
            return None
        if mask is None:
            mask = np.zeros(image.shape[:2], np.uint8)
        if self.augment is not None:
            out = self.augment(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return to_tensor(image), mask_to_tensor(mask), pair.id


def seed_worker(worker_id):
    """DataLoader worker_init_fn: each worker's augmentation follows the loader's seed."""
    dataset = torch.utils.data.get_worker_info().dataset
    if getattr(dataset, "augment", None) is not None:
        dataset.augment.set_random_seed(torch.initial_seed() % 2**32)


def collate_skip_none(batch):
    """default_collate without the items that failed to load; None when none is left."""
    batch = [item for item in batch if item is not None]
    return default_collate(batch) if batch else None


# ---------------------------------------------------------------------------- demo data

SKIN_TONES = [(236, 204, 190), (226, 184, 164), (214, 168, 140), (232, 176, 166), (200, 150, 120),
              (224, 196, 176), (190, 136, 110)]  # RGB, pale to tanned, some pinkish
PIGMENT_RAMP = np.float32([(196, 142, 100), (150, 92, 58), (98, 56, 36), (52, 34, 32)])  # RGB


def _noise(rng, h, w, cell):
    """Smooth noise of unit spread with features about `cell` pixels wide."""
    grid = rng.standard_normal((h // cell + 2, w // cell + 2)).astype(np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def _lesion_outline(rng, h, w, fraction):
    """Irregular closed contour (polar curve with random harmonics) covering ~fraction of h x w."""
    theta = np.linspace(0, 2 * np.pi, 240, endpoint=False)
    radius = np.ones_like(theta)
    for k in range(2, 9):
        radius += rng.uniform(0, 0.22 / k ** 0.7) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    jitter = np.convolve(np.tile(rng.standard_normal(240), 3), np.ones(7) / 7, "same")[240:480]
    radius = np.clip(radius + 0.05 * jitter, 0.35, None)
    stretch, angle = rng.uniform(0.65, 1.0), rng.uniform(0, np.pi)
    x, y = radius * np.cos(theta), radius * np.sin(theta) * stretch
    x, y = x * np.cos(angle) - y * np.sin(angle), x * np.sin(angle) + y * np.cos(angle)
    if rng.random() < 0.25:  # a quarter run off an edge, as close-up photos do
        cx, cy = rng.choice([0.1, 0.9]) * w, rng.uniform(0.2, 0.8) * h
    else:
        cx, cy = rng.uniform(0.35, 0.65) * w, rng.uniform(0.35, 0.65) * h
    scale = np.sqrt(fraction * h * w / (np.pi * stretch))
    for _ in range(6):  # rescale until the part inside the frame has the wanted area
        pts = np.stack([cx + scale * x, cy + scale * y], 1).round().astype(np.int32)
        mask = cv2.fillPoly(np.zeros((h, w), np.uint8), [pts], 1)
        got = mask.mean()
        if abs(got / fraction - 1) < 0.05:
            break
        scale *= np.sqrt(fraction / max(got, 1e-4))
    return pts, mask


def _hairs(rng, image, lesion_pts, count):
    """Dark curved hairs, about half of them crossing the lesion."""
    h, w = image.shape[:2]
    for _ in range(count):
        if rng.random() < 0.5:
            start = lesion_pts[rng.integers(len(lesion_pts))] * 0.6 + lesion_pts.mean(0) * 0.4
        else:
            start = rng.uniform((0, 0), (w, h))
        angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.7) * w
        t = np.linspace(-0.5, 0.5, 32)[:, None]
        d = np.array([np.cos(angle), np.sin(angle)])
        bend = length * (rng.uniform(-0.4, 0.4) * (t ** 2 - 0.25) + rng.uniform(-0.1, 0.1) * t ** 3)
        pts = start + t * length * d + bend * np.array([-d[1], d[0]])
        colour = [int(v) for v in rng.integers(10, 70) + rng.integers(0, 15, 3)]
        thickness = max(1, round(w / 900 * rng.uniform(0.7, 2.0)))
        cv2.polylines(image, [pts.astype(np.int32)], False, colour, thickness, cv2.LINE_AA)


def _ruler(rng, image):
    h, w = image.shape[:2]
    y, x0 = int(h * rng.uniform(0.85, 0.94)), int(w * rng.uniform(0.05, 0.2))
    x1, step, colour = int(x0 + w * rng.uniform(0.4, 0.6)), max(4, w // 120), (60, 55, 55)
    cv2.line(image, (x0, y), (x1, y), colour, max(1, w // 600))
    for i, x in enumerate(range(x0, x1, step)):
        tick = step * (2 if i % 10 == 0 else 1)
        cv2.line(image, (x, y), (x, y - tick), colour, 1)
    cv2.putText(image, "mm", (x0, y + 3 * step), cv2.FONT_HERSHEY_SIMPLEX, w / 1500, colour, 1)


def _radial(xx, yy, centre, sigma):
    return np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * sigma ** 2))


def demo_pair(rng):
    """One generated dermoscopy-like (RGB uint8 image, 0/255 uint8 mask)."""
    w = int(rng.integers(2000, 2600) if rng.random() < 0.08 else rng.integers(600, 1500))
    h = int(w * rng.uniform(0.6, 0.85))
    lh, lw = h // 4, w // 4  # colours and textures are made at quarter size, then upscaled
    fraction = 0.035 + 0.535 * rng.random() ** 1.6  # lesion share, ~3% to 60%, most small
    pts, small_mask = _lesion_outline(rng, lh, lw, fraction)
    mask = cv2.fillPoly(np.zeros((h, w), np.uint8), [pts * 4 + 2], 255)
    yy, xx = np.mgrid[0:lh, 0:lw].astype(np.float32)

    tone = np.float32(SKIN_TONES[rng.integers(len(SKIN_TONES))]) + rng.normal(0, 8, 3)
    grain = _noise(rng, lh, lw, 30) * 3 + _noise(rng, lh, lw, 6) * 3 + _noise(rng, lh, lw, 1) * 2.5
    skin = tone + grain[..., None]
    skin *= 1 + 0.06 * (xx / lw - 0.5)[..., None] * rng.uniform(-1, 1)  # uneven lighting
    for _ in range(int(rng.integers(0, 12))):  # faint freckles, which are not the lesion
        spot = rng.uniform((0, 0), (lw, lh))
        depth = _radial(xx, yy, spot, rng.uniform(0.6, 2.0)) * rng.uniform(10, 30)
        skin -= depth[..., None] * (1, 1.4, 1.7)  # brown: blue falls most

    # pigment: uneven, darkest near an off-centre core, light brown to near black
    size = np.sqrt(small_mask.sum())
    core = pts[rng.integers(len(pts))] * 0.4 + pts.mean(0) * 0.6
    darkness = (0.5 * _radial(xx, yy, core, 0.3 * size)
                + 0.2 * _noise(rng, lh, lw, max(4, int(size) // 8)))
    darkness += _noise(rng, lh, lw, 2) * rng.uniform(0.05, 0.15)  # dots and network
    low, span = rng.uniform(0.05, 0.5), rng.uniform(0.4, 1.0)
    level = np.clip(low + span * darkness, 0, 0.999) * (len(PIGMENT_RAMP) - 1)
    step = level.astype(np.int32)
    blend = (level - step)[..., None]
    pigment = PIGMENT_RAMP[step] * (1 - blend) + PIGMENT_RAMP[step + 1] * blend
    if rng.random() < 0.15:  # some lesions are reddish rather than brown
        pigment = pigment * 0.7 + np.float32((190, 95, 90)) * 0.3
    softness = rng.uniform(0.5, 2.0) * max(1.0, size / 80)
    alpha = cv2.GaussianBlur(small_mask.astype(np.float32), (0, 0), softness)[..., None]
    alpha *= rng.uniform(0.8, 1.0)
    image = skin * (1 - alpha) + pigment * alpha
    if rng.random() < 0.25:  # dark corners of a round dermoscope field
        r = np.hypot((xx - lw / 2) / (lw / 2), (yy - lh / 2) / (lh / 2))
        image *= (1 - np.clip((r - rng.uniform(1.0, 1.25)) / 0.12, 0, 1) * 0.92)[..., None]
    image = cv2.resize(np.clip(image, 0, 255).astype(np.uint8), (w, h),
                       interpolation=cv2.INTER_LINEAR)
    if rng.random() < 0.3:
        _hairs(rng, image, pts * 4, int(rng.integers(2, 20)))
    if rng.random() < 0.2:
        _ruler(rng, image)
    return image, mask


def make_demo(root=DEMO_DIR, count=DEMO_COUNT, seed=DEMO_SEED):
    """Write `count` generated pairs in the ISIC 2018 Task 1 layout under root.

    The same seed gives the same bytes. Ids start at ISIC_9000000, outside the real range."""
    root = Path(root)
    images = root / "ISIC2018_Task1-2_Training_Input"
    masks = root / "ISIC2018_Task1_Training_GroundTruth"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image, mask = demo_pair(np.random.default_rng([seed, i]))
        pair_id = f"ISIC_{9000000 + i:07d}"
        for path, array, params in ((images / f"{pair_id}.jpg", image[..., ::-1],
                                     [cv2.IMWRITE_JPEG_QUALITY, 90]),
                                    (masks / f"{pair_id}_segmentation.png", mask, [])):
            if not cv2.imwrite(str(path), array, params):  # cv2 reports failure, never raises
                raise OSError(f"cannot write {path}")
    _write_json(root / DEMO_MARKER, {"generated_by": "load_dataset.make_demo", "count": count,
                                     "seed": seed})
    return root


# ---------------------------------------------------------------------------- command line

def no_data_message(root):
    return (f"No usable image/mask pairs under {root}.\n"
            f"Put the ISIC files there, one folder per archive, for example:\n"
            f"  {root}/ISIC2018_Task1-2_Training_Input/ISIC_0000000.jpg\n"
            f"  {root}/ISIC2018_Task1_Training_GroundTruth/ISIC_0000000_segmentation.png\n"
            f"(ISIC 2016/2017 folders, or a folder of images beside a folder of masks named "
            f"<image stem>_segmentation.png, work too.)\n"
            f"Or make generated demo data instead: python load_dataset.py --make-demo "
            f"(then --data {DEMO_DIR}), or run python train_model.py --demo")


def _split_lines(found, splits):
    drawn = [s for s in ("valid", "test") if not found.splits.get(s)]
    lines = ["Split:"]
    for s in ("train", "valid", "test"):
        if s == "train":
            how = f"training pairs left after drawing {'+'.join(drawn)}" if drawn else "official"
        elif s in drawn:
            how = f"drawn from training, saved in {work_dir(found.root) / 'split.json'}"
        else:
            how = "official"
        lines.append(f"  {s}: {len(splits[s])} pairs ({how})")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None,
                        help=f"data folder (default: {DATA_DIR}, or {DEMO_DIR} with --make-demo)")
    parser.add_argument("--make-demo", action="store_true", help="write generated demo pairs")
    parser.add_argument("--count", type=int, default=DEMO_COUNT, help="demo pairs to generate")
    parser.add_argument("--seed", type=int, default=None,
                        help=f"demo seed (default {DEMO_SEED}) or split seed (default {SEED})")
    parser.add_argument("--min-side", type=int, default=MIN_SIDE, help="smallest usable image side")
    args = parser.parse_args(argv)

    if args.make_demo:
        root = Path(args.data or DEMO_DIR)
        try:
            make_demo(root, args.count, DEMO_SEED if args.seed is None else args.seed)
        except OSError as err:
            print(f"cannot write demo data to {root}: {err.strerror or err}", file=sys.stderr)
            return 2
        print(f"wrote {args.count} demo pairs to {root} (ISIC 2018 Task 1 layout)")
        return 0

    root = Path(args.data or DATA_DIR)
    found = scan(root, min_side=args.min_side)
    print(found.summary())
    if not found.pair_count():
        print(no_data_message(root), file=sys.stderr)
        return 2
    seed = SEED if args.seed is None else args.seed
    try:
        splits = split_pairs(found, seed=seed)
    except (SplitMismatch, OSError) as err:
        print(err, file=sys.stderr)
        return 2
    print(_split_lines(found, splits))
    return 0


if __name__ == "__main__":
    sys.exit(main())
