"""Finding image/mask pairs on disk (ISIC layouts), checking and correcting them, the
train/valid/test split and its folds, the Dataset and its loaders, the preprocessed cache.

    python load_dataset.py --data data      # layout found, pairs per split, corrected/skipped files
    python load_dataset.py --data data --build-cache --image-size 320 320   # cache, ahead

The demo pairs are written by `python demo_data.py`.
"""
import argparse
import hashlib
import json
import os
import random
import re
import struct
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

import preprocess
from demo_data import DEMO_DIR, DEMO_MARKER
from preprocess import ImageError, image_info, read_image, read_mask

DATA_DIR = "data"  # default data folder
VALID_FRACTION = 0.1  # share of training pairs drawn for validation when there is no official set
TEST_FRACTION = 0.1  # share drawn for test when there is no official test set
MIN_SIDE = 32  # images smaller than this on either side are skipped (FPN's total stride)
POOL_MIN_FILES = 64  # fewer files than this are checked in-process (a pool costs more to start)
CHECK_VERSION = 2  # bump when the checks change, so cached results are not reused
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
CACHE_FOLDER = ".cache"  # under the work folder: preprocessed arrays and the scan's memo

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
    exif: bool = True  # turn the image by its EXIF orientation (the mask's shape decides)


@dataclass
class ScanResult:
    root: Path
    layout: str
    splits: dict = field(default_factory=dict)  # official split name -> [Pair] sorted by id
    corrected: list = field(default_factory=list)  # [(path, what was corrected)]
    skipped: list = field(default_factory=list)  # [(path, why)]
    sources: list = field(default_factory=list)  # image folders the pairs come from (relative)

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

# what Pillow and OpenCV raise for a file they cannot decode (Pillow also raises
# SyntaxError and struct.error for some damaged headers; OpenCV raises cv2.error)
DECODER_ERRORS = (OSError, ValueError, SyntaxError, EOFError, MemoryError, struct.error,
                  cv2.error, Image.DecompressionBombError)

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


def describe_error(err, path):
    """"<path>: <reason>", naming the path once even where the error's text names it too."""
    return f"{path}: {_reason(err, path)}"


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
            return {"error": None, "notes": notes, "hw": [info["height"], info["width"]],
                    "info": info}
        mask = read_mask(path, notes=notes)
        return {"error": None, "notes": notes, "hw": list(mask.shape[:2])}
    except ImageError as err:
        return {"error": f"unreadable {role}: {_reason(err, path)}"}
    except DECODER_ERRORS as err:  # one odd file must never stop a scan of thousands; a bug
        # in the project's own checks (a TypeError, a KeyError...) surfaces instead
        return {"error": f"unreadable {role}: {type(err).__name__}: {_reason(err, path)}"}


def _run_checks(tasks, progress=True):
    processes = os.cpu_count() or 1
    if len(tasks) < POOL_MIN_FILES or processes == 1:
        return [check_file(t) for t in tasks]
    chunk = max(1, min(32, len(tasks) // (processes * 8)))
    return preprocess.process_map(check_file, tasks, processes, chunk, "checking files", "file",
                                  progress)


def _check_all(tasks, cache_file, progress=True):
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
    for (path, _), result in zip(todo, _run_checks([(str(p), r) for p, r in todo], progress)):
        entries[keys[path]] = result
    results.update({path: entries[key] for path, key in keys.items()})
    if todo:
        fresh = {key: entries[key] for key in keys.values()}  # forget files no longer there
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
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
    if preprocess.same_aspect(mask_hw, image_hw):
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
        exif, problem = True, None
        if image and mask:
            exif, turn_note, image_hw = _orientation(checks.get(image, {}), checks.get(mask, {}),
                                                     image, mask)
            if exif is None:
                problem = ("skipped", turn_note)
            elif turn_note:
                result.corrected.append((image, turn_note))
            if problem is None:
                problem = _size_problem(image_hw, checks.get(mask, {}).get("hw"))
        if problem and problem[0] == "skipped":
            result.skipped += [(mask, problem[1]), (image, f"its mask {mask.name} is unusable")]
        elif image and not mask:
            result.skipped.append((image, f"its mask {masks[pair_id][0].name} is unusable"))
        elif mask and not image:
            result.skipped.append((mask, f"its image {images[pair_id][0].name} is unusable"))
        elif image and mask:
            pairs.append((Pair(pair_id, image, mask, exif), problem))
    return pairs


def _orientation(image_check, mask_check, image, mask):
    """(turn by EXIF?, note, image (h, w) as it will be read) of a pair; the mask decides, by
    its shape or else by content (None: it cannot tell, and the pair is skipped)."""
    info, mask_hw = image_check.get("info"), mask_check.get("hw")
    if not info or not mask_hw or info["orientation"] == 1:
        return True, None, image_check.get("hw")
    try:
        exif, note = preprocess.pair_orientation(info, tuple(mask_hw), image, mask)
    except (ImageError, OSError) as err:  # changed since it was checked
        return None, f"unreadable: {_reason(err, image)}", None
    hw = [info["height"], info["width"]]
    if not exif and info["orientation"] in (5, 6, 7, 8):
        hw = hw[::-1]
    return exif, note, hw


def scan(root, min_side=MIN_SIDE, progress=True):
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
    checks = _check_all(tasks, scan_memo(root), progress) if tasks else {}

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
    result.sources = sorted({os.path.relpath(p.image.parent, root) for p in kept.values()})
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


def split_file_for(data_root):
    """The split file of a data folder: train_model.py writes it, test_model.py reads it."""
    return work_dir(data_root) / "split.json"


def cache_dir_for(data_root):
    return work_dir(data_root) / CACHE_FOLDER


def scan_memo(data_root):
    """The memo of file checks, beside the cache: a rescan decodes only changed files."""
    return cache_dir_for(data_root) / "scan_memo.json"


def _write_json(path, obj):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    preprocess.write_text(path, json.dumps(obj, indent=1))


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


def drawn_splits(official):
    """The splits drawn from training (and kept in the split file): valid and test where they
    have no official pairs, when there are training pairs to draw them from."""
    missing = [s for s in ("valid", "test") if not official.get(s)]
    return missing if official.get("train") else []


def split_pairs(scan_result, seed=None, valid_fraction=VALID_FRACTION,
                test_fraction=TEST_FRACTION, split_file=None):
    """train/valid/test pairs: official sets where present, else drawn once with `seed` and
    saved; the saved split wins from then on (a `seed` of None: whatever it was drawn with)."""
    official = scan_result.splits
    train = {p.id: p for p in official.get("train", [])}
    missing = drawn_splits(official)
    if not missing:
        return {s: list(official.get(s, [])) for s in ("train", "valid", "test")}
    split_file = Path(split_file) if split_file else split_file_for(scan_result.root)
    if split_file.exists():
        ids, saved = _read_split(split_file, train, missing)
        if seed is not None and [saved.get("seed"), saved.get("valid_fraction"),
                                 saved.get("test_fraction")] != [seed, valid_fraction,
                                                                 test_fraction]:
            warnings.warn(f"using the split saved in {split_file} (seed {saved.get('seed')}); "
                          f"delete it to draw one with seed {seed}")
    elif seed is None:
        raise SplitMismatch(f"no split file at {split_file}: a seed is needed to draw the "
                            f"split (train_model.py draws it with its SEED)")
    else:
        ids = _draw(train, missing, seed, valid_fraction, test_fraction)
        _write_json(split_file, {"seed": seed, "valid_fraction": valid_fraction,
                                 "test_fraction": test_fraction, "drawn": missing, "ids": ids})
    splits = {s: [train[i] for i in ids[s]] for s in ids}
    for s in ("valid", "test"):
        if s not in missing:
            splits[s] = list(official[s])
    return splits


def fold_ids(ids, k, seed):
    """K folds of ids: sorted, shuffled with the seed, then every k-th; each id in one fold."""
    ids = sorted(ids)
    random.Random(seed).shuffle(ids)
    return [sorted(ids[j::k]) for j in range(k)]


def fold_splits(scan_result, splits, k, fold, seed, split_file=None):
    """train/valid/test of fold `fold` of k: the training pairs (with the validation pairs when
    those were drawn from training) fall into k seeded folds, kept in the split file; fold
    `fold` validates, the others train. The test split is never in a fold."""
    if not 0 <= fold < k:
        raise SplitMismatch(f"fold {fold} does not exist: folds are numbered 0 to {k - 1}")
    drawn_valid = not scan_result.splits.get("valid")
    pool = {p.id: p for p in splits["train"] + (splits["valid"] if drawn_valid else [])}
    split_file = Path(split_file) if split_file else split_file_for(scan_result.root)
    saved = json.loads(split_file.read_text()) if split_file.exists() else {}
    folds = fold_ids(pool, k, seed)
    record = saved.get("folds")
    if record and (record.get("k"), record.get("seed")) == (k, seed) and \
            sorted(i for f in record["ids"] for i in f) != sorted(pool):
        raise SplitMismatch(f"{split_file}: its folds do not match the pairs on disk; delete "
                            f"it or pass --redraw-split to train_model.py")
    if record != {"k": k, "seed": seed, "ids": folds}:
        _write_json(split_file, {**saved, "folds": {"k": k, "seed": seed, "ids": folds}})
    held = set(folds[fold])
    return {"train": [pool[i] for i in sorted(pool) if i not in held],
            "valid": [pool[i] for i in folds[fold]], "test": list(splits["test"])}


def run_splits(ckpt, data_dir=None):
    """train/valid/test pairs as a checkpoint's run saw them: its data folder (or `data_dir`),
    its split file and, for a fold model, its fold."""
    run = ckpt["settings"]
    data_dir = Path(data_dir or run["data"])
    split_file = Path(ckpt["split_file"]) if ckpt.get("split_file") and data_dir == Path(
        run["data"]) else split_file_for(data_dir)
    found = scan(data_dir, progress=False)
    splits = split_pairs(found, seed=run["seed"], split_file=split_file)
    if run.get("fold") is not None:
        splits = fold_splits(found, splits, run["folds"], run["fold"], run["seed"], split_file)
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
    """Per pair: (image float32 3xHxW normalised, mask float32 1xHxW 0/1, id), and with
    `truth` also the true mask at its own size, as packed bits, and its (h, w).

    Indices come from EpochSampler as (epoch, i): each sample's augmentation is seeded from
    the seed, the epoch and i alone, never from a loader worker's history, so a resumed run
    augments exactly as a straight one, with any number of workers."""

    def __init__(self, pairs, settings, augment=None, cache=None, seed=0, truth=False):
        """augment: None, or a strength of preprocess.AUGMENTS ("full", "flips")."""
        self.pairs = list(pairs)
        self.settings = settings = preprocess.as_settings(settings)
        self.cache, self.seed, self.truth = cache, seed, truth
        self.augment = (preprocess.train_augment(settings.size_hw, strength=augment)
                        if augment else None)

    def __len__(self):
        return len(self.pairs)

    def _read(self, pair):
        truth = None
        if self.cache is not None:
            image, mask = self.cache.load(pair.image, pair.mask, pair.exif)
            if self.truth:
                truth = self.cache.truth(pair.mask)
            return image, mask, truth
        image = read_image(pair.image, min_hw=self.settings.size_hw, exif=pair.exif)
        mask = read_mask(pair.mask) if pair.mask else None
        if self.truth:
            truth = preprocess.pack_truth(mask > 0)
        image, mask = preprocess.resize_pair(image, mask, self.settings.size_hw,
                                             self.settings.interpolation)
        return image, mask, truth

    def __getitem__(self, index):
        epoch, i = index if isinstance(index, tuple) else (0, index)
        pair = self.pairs[i]
        try:
            image, mask, truth = self._read(pair)
        except (ImageError, OSError) as err:  # the file changed after the scan
            named = [p for p in (pair.image, pair.mask) if p and str(p) in str(err)]
            path = named[0] if named else getattr(err, "filename", None) or pair.image
            warnings.warn(f"skipping {path}: {_reason(err, path)}")
            return None
        if mask is None:
            mask = np.zeros(image.shape[:2], np.uint8)
        if self.augment is not None:
            self.augment.set_random_seed(sample_seed(self.seed, epoch, i))
            out = self.augment(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        item = (preprocess.to_tensor(image, self.settings.mean, self.settings.std),
                preprocess.mask_to_tensor(mask), pair.id)
        return item + truth if truth is not None else item


def sample_seed(seed, epoch, i):
    return int(np.random.SeedSequence([seed, epoch, i]).generate_state(1)[0])


class EpochSampler(Sampler):
    """(epoch, i) for each index of an epoch, shuffled from (seed, epoch) alone when `shuffle`.
    Call set_epoch before each epoch.

    Under several processes (`world` > 1) process `rank` takes every world-th index of the same
    order. Training (`pad`) repeats the first indices so that every process steps equally
    often, as DistributedSampler does; validation takes each index exactly once."""

    def __init__(self, size, seed=0, shuffle=True, rank=0, world=1, pad=False):
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0
        self.rank, self.world, self.pad = rank, world, pad

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        order = range(self.size)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        order = list(order)
        if self.pad and self.size % self.world:
            order += order[:self.world - self.size % self.world]
        return ((self.epoch, i) for i in order[self.rank::self.world])

    def __len__(self):
        total = -(-self.size // self.world) * self.world if self.pad else self.size
        return len(range(self.rank, total, self.world))


def collate_skip_none(batch):
    """[images, masks, ids] (and [(truth bits, (h, w))] when present) without the items
    that failed to load; None when none is left."""
    batch = [item for item in batch if item is not None]
    if not batch:
        return None
    stacked = default_collate([item[:3] for item in batch])
    if len(batch[0]) > 3:
        stacked.append([item[3:] for item in batch])
    return stacked


@dataclass(frozen=True)
class LoaderOptions:
    """How a loader runs, beside what it reads: worker processes, the cache, the seed of the
    shuffling and augmentation, pinned memory, and this process's share under torchrun."""
    workers: int = 0
    cache: object = None
    seed: int = 0
    pin_memory: bool = False
    rank: int = 0
    world: int = 1


def make_loader(pairs, settings, batch_size, options=None, train=False, augment="full",
                truth=False):
    """A DataLoader of a split: shuffled and augmented (`augment`) for training, in order
    otherwise; with `truth`, each item also carries its true mask at its own size.

    Workers persist across epochs; what they produce depends only on (seed, epoch, index)."""
    o = options or LoaderOptions()
    if o.workers:
        preprocess.before_fork()
    dataset = SegmentationDataset(pairs, settings, augment=augment if train else None,
                                  cache=o.cache, seed=o.seed, truth=truth)
    sampler = EpochSampler(len(dataset), o.seed, shuffle=train, rank=o.rank, world=o.world,
                           pad=train)
    # a generator of its own: starting workers draws a seed from it, and drawing from the
    # global one would shift the model's dropout in the first epoch a loader is used
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                      drop_last=train and len(sampler) > batch_size, num_workers=o.workers,
                      pin_memory=o.pin_memory, collate_fn=collate_skip_none,
                      persistent_workers=o.workers > 0,
                      generator=torch.Generator().manual_seed(o.seed))


def pairs_digest(pairs):
    """A short digest of the files a list of pairs names (id, and the sizes in bytes of image
    and mask): runs on other images never share it, a copied or moved data folder keeps it."""
    def size(path):
        try:
            return os.stat(path).st_size if path else -1
        except OSError:
            return -1
    text = "\n".join(f"{p.id}|{size(p.image)}|{size(p.mask)}" for p in sorted(pairs,
                                                                           key=lambda p: p.id))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- command line

def no_data_message(root):
    root = Path(root)
    if MASK_FOLDER.search(root.name) or root.name.lower() in ("images", "image", "imgs"):
        return (f"No usable image/mask pairs under {root}: it looks like the images or the "
                f"masks folder of a dataset. Point --data at its parent, {root.parent}, which "
                f"holds both.")
    return (f"No usable image/mask pairs under {root}.\n"
            f"Put the ISIC files there, one folder per archive, for example:\n"
            f"  {root}/ISIC2018_Task1-2_Training_Input/ISIC_0000000.jpg\n"
            f"  {root}/ISIC2018_Task1_Training_GroundTruth/ISIC_0000000_segmentation.png\n"
            f"(ISIC 2016/2017 folders, or a folder of images beside a folder of masks named "
            f"<image stem>_segmentation.png, work too.)\n"
            f"Or make generated demo data instead: python demo_data.py "
            f"(then --data {DEMO_DIR}), or run python train_model.py --demo")


def pairs_word(n):
    return f"{n} pair" if n == 1 else f"{n} pairs"


def _split_lines(found, splits):
    drawn = [s for s in ("valid", "test") if not found.splits.get(s)]
    lines = ["Split:"]
    for s in ("train", "valid", "test"):
        if s == "train":
            how = f"training pairs left after drawing {'+'.join(drawn)}" if drawn else "official"
        elif s in drawn:
            how = f"drawn from training, saved in {split_file_for(found.root)}"
        else:
            how = "official"
        lines.append(f"  {s}: {pairs_word(len(splits[s]))} ({how})")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default=DATA_DIR, help="data folder")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the split, when none is saved yet (train_model.py "
                             "draws it with its SEED; None: the saved split, or none drawn)")
    parser.add_argument("--min-side", type=int, default=MIN_SIDE, help="smallest usable image side")
    parser.add_argument("--build-cache", action="store_true",
                        help="decode and resize every pair into the cache ahead of training")
    parser.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="working size of --build-cache: the IMAGE_SIZE of the run that "
                             "will read it (required with --build-cache)")
    args = parser.parse_args(argv)
    if args.build_cache and args.image_size is None:
        parser.error("--build-cache needs --image-size H W: the IMAGE_SIZE of the run that "
                     "will read the cache")

    root = Path(args.data)
    found = scan(root, min_side=args.min_side)
    print(found.summary())
    if not found.pair_count():
        print(no_data_message(root), file=sys.stderr)
        return 2
    drawn = drawn_splits(found.splits)
    if drawn and args.seed is None and not split_file_for(root).exists():
        print(f"split: none drawn yet (train_model.py draws it with its SEED, or pass --seed "
              f"N); memo of file checks: {scan_memo(root)}")
    else:
        try:
            splits = split_pairs(found, seed=args.seed)
        except (SplitMismatch, OSError) as err:
            print(err, file=sys.stderr)
            return 2
        print(_split_lines(found, splits))
        print(f"split file: {split_file_for(root) if drawn else 'none (nothing to draw)'}; "
              f"memo of file checks: {scan_memo(root)}")
    if args.build_cache:
        return build_cache(found, tuple(args.image_size))
    return 0


def build_cache(found, size_hw):
    pairs = [p for split in found.splits.values() for p in split]
    cache = preprocess.PreprocessCache(cache_dir_for(found.root), size_hw)
    errors = cache.build(pairs)
    for path, err in errors:
        print(f"skipped {path}: {_reason(err, path)}", file=sys.stderr)
    print(f"cache: {len(pairs) - len(errors)} pairs at {size_hw[0]}x{size_hw[1]} in {cache.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
