"""Predict lesion masks with a checkpoint of train_model.py; score them as the ISIC challenge does.

    python test_model.py                            # a random test image -> mask + overlay figure
    python test_model.py --image a.jpg my_folder/   # your own images (no training data needed)
    python test_model.py --evaluate --split test    # every image of a split: ISIC masks + scores
    python test_model.py --threshold-analysis       # probability histogram, score vs threshold

Edit the constants below, or pass the matching flag.
"""
import argparse
import json
import os
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import checkpoint as ckpt_lib
import device as device_lib
import load_dataset
import metrics
import predict
import preprocess
import report
import settings as settings_lib
from checkpoint import CheckpointError
from predict import OnnxPredictor, Predictor, UsageError, load_predictor
from settings import Setting, SettingError

# ----------------------------------------------------------------------------- settings
MODEL_DIR = "Model"
CHECKPOINT = None
EVALUATE_SPLIT = "test"
ANALYSIS_SPLIT = "valid"           # never tune on test
THRESHOLD = None                   # None: the checkpoint's
TTA = "none"
POSTPROCESS = False
THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 .. 0.95
BEST_BY = "iou"
BATCH_SIZE = 8
WORKERS = min(4, os.cpu_count() or 1)
SEED = None                        # None: a new random test image every run
DEVICE = "auto"
MIXED_PRECISION = True
CHANNELS_LAST = True
CUDNN_BENCHMARK = True

SETTINGS = [  # every one is a flag (settings.py); none is recorded anywhere
    Setting("MODEL_DIR", "where the default checkpoint is looked for"),
    Setting("CHECKPOINT", "checkpoint file(s) or folder(s), or one .onnx file; several: an "
            "ensemble (mean probability); default: the newest best model under --model-dir, "
            "one on real data before a demo model", nargs="+", metavar="PATH"),
    Setting("EVALUATE_SPLIT", "split scored by --evaluate when --split is not given",
            choices=("test", "valid", "train")),
    Setting("ANALYSIS_SPLIT", "split of --threshold-analysis when --split is not given",
            choices=("test", "valid", "train")),
    Setting("THRESHOLD", "lesion probability cut; default: the one stored in the checkpoint",
            type=float),
    Setting("TTA", "test-time views whose probabilities are averaged",
            choices=predict.TTA_MODES),
    Setting("POSTPROCESS", "keep the largest lesion region, holes filled"),
    Setting("THRESHOLDS", "the grid of --threshold-analysis", nargs="+", metavar="T",
            shown="0.05 ... 0.95 (19 values)"),
    Setting("BEST_BY", "score --threshold-analysis maximises",
            choices=("iou", "threshold_jaccard")),
    Setting("BATCH_SIZE", "images per forward pass over a split"),
    Setting("WORKERS", "loader processes decoding images beside the model",
            shown="cores, at most 4"),
    Setting("SEED", "seed of the random test image", type=int),
    Setting("DEVICE", '"auto" (CUDA when present), "cuda" or "cpu"',
            choices=device_lib.DEVICES),
    Setting("MIXED_PRECISION", "autocast on CUDA and on CPUs with native bfloat16 "
            "(probabilities in float32)"),
    Setting("CHANNELS_LAST", "channels_last memory format, on CUDA and under CPU bfloat16"),
    Setting("CUDNN_BENCHMARK", "CUDA: let cuDNN pick the fastest kernels for the input size"),
]
# ---------------------------------------------------------------------------------------

HISTOGRAM_BINS = 100  # bins of the probability histogram over [0, 1]
FIGURE_MAX_SIDE = 1024  # bigger images are shrunk to this for the overlay figure
NOT_IMAGES = ("_segmentation", "_mask", "_superpixels", "_overlay")  # stems skipped in folders


# ----------------------------------------------------------------------------- model


def finish_mask(prob, threshold, postprocess):
    """Lesion mask (bool) of a probability map at the size it will be scored or written."""
    pred = preprocess.binarise(prob, threshold)
    return preprocess.largest_region_filled(pred) if postprocess else pred


def to_png_mask(pred):
    """bool mask -> 0/255 uint8, as the ISIC scorer reads it."""
    return np.where(pred, 255, 0).astype(np.uint8)


# ----------------------------------------------------------------------------- files

def write_mask(mask, path):
    """0/255 mask as an 8-bit grayscale (mode L) PNG, the format the ISIC scorer reads."""
    with preprocess.atomic_write(path) as tmp:
        # a 24 MP mask: fast beats small
        Image.fromarray(mask).save(tmp, format="PNG", compress_level=1)


def image_files(paths):
    """(image path, true mask beside it or None, name) for files and the images in folders."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.is_file()
                            and p.suffix.lower() in load_dataset.IMAGE_EXTENSIONS
                            and not p.stem.lower().endswith(NOT_IMAGES))
        elif path.exists():
            found.append(path)
        else:
            print(f"skipped {path}: no such file or folder", file=sys.stderr)
    return [(p, true_mask_of(p), name) for p, name in zip(found, unique_names(found))]


IMAGE_FOLDER = re.compile(r"image|input|img", re.I)  # the images half of an images/masks pair


def true_mask_of(image):
    """The true mask of an image: <stem>_segmentation.png (or _mask.png) beside it, or, for an
    image in an images folder, in a masks folder beside that one (images/ + masks/, an ISIC
    _Input folder + its _GroundTruth), as the data scan pairs them; else None."""
    image = Path(image)
    names = (f"{image.stem}_segmentation.png", f"{image.stem}_mask.png")
    folders = [image.parent]
    if IMAGE_FOLDER.search(image.parent.absolute().name):
        try:
            folders += sorted(d for d in image.parent.absolute().parent.iterdir()
                              if d.is_dir() and load_dataset.MASK_FOLDER.search(d.name))
        except OSError:
            pass
    return next((folder / name for folder in folders for name in names
                 if (folder / name).is_file()), None)


def unique_names(paths):
    """Output names: the file stem, with its folders in front where two inputs share a stem."""
    paths = [Path(p).absolute() for p in paths]
    names, depth = [p.stem for p in paths], 0
    while len(set(names)) < len(names) and depth < 8:
        depth += 1
        stems = [p.stem for p in paths]
        names = [n if stems.count(s) == 1 else "_".join(p.parts[-1 - depth:-1] + (s,))
                 for n, s, p in zip(names, stems, paths)]
    seen = {}
    for i, name in enumerate(names):  # the same file given twice
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            names[i] = f"{name}_{seen[name]}"
    return names


def data_dir_of(ckpt, data):
    """The data folder to score: --data, else the one the checkpoint was trained on."""
    return Path(data or ckpt["settings"]["data"])


def scored_folder(predictor, data, split):
    """<split>, or <split>_<data folder name> for data other than the checkpoint's own: the
    results of two datasets never share a folder."""
    own = predictor.ckpt["settings"]["data"]
    if data is None or (own and Path(data).resolve() == Path(own).resolve()):
        return split
    return f"{split}_{Path(data).resolve().name}"


def load_split(ckpt, data, split):
    """Pairs of a split, found as the checkpoint's training run found them (or under --data);
    a fold model's train and valid splits are those of its fold."""
    data_dir = data_dir_of(ckpt, data)
    if data or not ckpt.get("split_file"):
        split_file = load_dataset.split_file_for(data_dir)
    else:
        split_file = Path(ckpt["split_file"])
    found = load_dataset.scan(data_dir)
    if not any(found.splits.values()):
        where = "given by --data" if data else "recorded in the checkpoint"
        raise UsageError(f"no image/mask pairs under {data_dir} (the data folder {where}); "
                         f"pass --data DIR")
    run = ckpt["settings"]
    splits = load_dataset.split_pairs(found, seed=run["seed"], split_file=split_file)
    if run["fold"] is not None:
        splits = load_dataset.fold_splits(found, splits, run["folds"], run["fold"], run["seed"],
                                          split_file)
    pairs = splits[split]
    if not pairs:
        raise UsageError(f"the {split} split of {data_dir} is empty (no image/mask pairs); "
                         f"add data or pick another --split")
    return pairs


# ----------------------------------------------------------------------------- one image

def save_overlay(image_path, prob, pred, truth, path, title, exif=True):
    """Image, probability map, and the predicted (and true) outline, shrunk for big images."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    h, w = prob.shape
    scale = min(1.0, FIGURE_MAX_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    side = FIGURE_MAX_SIDE
    image = cv2.resize(preprocess.read_image(image_path, min_hw=(side, side), exif=exif), size,
                       interpolation=cv2.INTER_AREA)
    fig, axes = plt.subplots(1, 3, figsize=(15, min(10, max(3, 5 * h / w)) + 0.6))
    axes[0].imshow(image)
    axes[0].set_title("image")
    shown = axes[1].imshow(cv2.resize(prob, size, interpolation=cv2.INTER_AREA), vmin=0, vmax=1,
                           cmap="magma")
    fig.colorbar(shown, ax=axes[1], fraction=0.046)
    axes[1].set_title("lesion probability")
    axes[2].imshow(image)
    handles = []
    for mask, colour, label in ((pred, "yellow", "predicted"), (truth, "cyan", "true")):
        if mask is None:
            continue
        small = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        if small.max() > 0:  # a zero border closes the outline of a lesion cut by the frame
            padded = np.pad(small, 1)
            axes[2].contour(np.arange(-1, size[0] + 1), np.arange(-1, size[1] + 1), padded,
                            levels=[0.5 * small.max()], colors=colour, linewidths=1.5)
        handles.append(Line2D([], [], color=colour, label=f"{label} outline"))
    axes[2].set(xlim=(-0.5, size[0] - 0.5), ylim=(size[1] - 0.5, -0.5))
    axes[2].legend(handles=handles, loc="lower right", fontsize=8)
    axes[2].set_title("outlines")
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    preprocess.save_figure(fig, path)


def predict_files(predictor, items, out, threshold, postprocess=False):
    """Mask PNG and overlay per (image, true mask or None, name); unreadable images are skipped.

    With no true mask, the mask is written in the orientation a viewer shows (EXIF applied);
    with one, it has the true mask's shape (the mask decides the orientation, as in training)."""
    out.mkdir(parents=True, exist_ok=True)
    report_replaced(out, [f"{name}_{kind}.png" for _, _, name in items
                          for kind in ("segmentation", "overlay")])
    done, level = 0, calibrated_level(predictor, threshold)
    for image_path, mask_path, name in items:
        try:
            truth, exif = None, True
            if mask_path is not None:
                truth = read_truth_beside(mask_path)
            if truth is not None:
                exif, note = preprocess.pair_orientation(preprocess.image_info(image_path),
                                                         truth.shape, image_path, mask_path)
                if exif is None:  # the content cannot tell: the pixels as stored, said so
                    print(f"note: {image_path.name}: {note}; the stored pixels are used")
                    exif = False
            prob = predictor.image(image_path, exif, truth.shape if truth is not None else None)
        except (preprocess.ImageError, OSError) as exc:
            print(f"skipped {load_dataset.describe_error(exc, image_path)}", file=sys.stderr)
            continue
        pred = finish_mask(prob, threshold, postprocess)
        confidence = image_confidence(predictor, image_path, exif, threshold)
        mask_file, figure = out / f"{name}_segmentation.png", out / f"{name}_overlay.png"
        write_mask(to_png_mask(pred), mask_file)
        line = ""
        if truth is not None:
            s = metrics.scores(*metrics.confusion(pred, truth))
            line = f"; IoU {s['iou']:.4f}, Dice {s['dice']:.4f} against {mask_path}"
        save_overlay(image_path, prob, pred, truth, figure,
                     f"{image_path.name}  ({predictor.name()}, threshold {threshold:g})",
                     exif)
        print(f"{image_path} ({pred.shape[1]}x{pred.shape[0]}): mask {mask_file}, "
              f"overlay {figure}{line}; confidence {confidence:.3f}")
        if level is not None and confidence < level:
            print(f"low confidence: review this mask ({confidence:.3f} < {level:.3f}, the level "
                  f"that set aside 90% of the failures on validation)")
        done += 1
    return done


def calibrated_level(predictor, threshold):
    """The confidence level stored by --calibrate, when it applies to this prediction: one
    checkpoint, the same confidence and threshold it was measured with."""
    stored = predictor.ckpt.get("confidence") or {}
    if len(predictor.members) != 1 or stored.get("name") != metrics.CONFIDENCE \
            or stored.get("level") is None:
        return None
    if abs(float(stored.get("threshold", threshold)) - threshold) > 1e-9:
        print(f"note: the stored confidence level was calibrated at threshold "
              f"{stored['threshold']:g}, not {threshold:g}: no review warning")
        return None
    return float(stored["level"])


def image_confidence(predictor, image_path, exif, threshold):
    """The per-image confidence of one image (metrics.CONFIDENCE), as --evaluate computes it."""
    images = preprocess.eval_input(image_path, predictor.settings, exif)[0]
    pair = load_dataset.Pair(id=Path(image_path).stem, image=Path(image_path), exif=exif)
    maps = confidence_maps(predictor, images, [pair])[0]
    return metrics.confidence_candidates(maps, threshold)[metrics.CONFIDENCE]


def read_truth_beside(mask_path):
    try:
        return preprocess.read_mask(mask_path) > 0
    except (preprocess.ImageError, OSError) as exc:
        print(f"true mask not used: {exc}", file=sys.stderr)
        return None


def report_replaced(out, names):
    """One line when this run overwrites results an earlier run left in `out`."""
    replaced = [n for n in names if (out / n).exists()]
    if replaced:
        print(f"note: replacing {len(replaced)} earlier result file(s) in {out}")


def network_names(members):
    """"FPN resnet18" of each member (one line for an ensemble)."""
    return ", ".join(f"{c['settings']['arch']} {c['settings']['encoder']}" for _, c, _ in members)


# ----------------------------------------------------------------------------- a whole split

def confidence_maps(predictor, images, pairs):
    """(N, members x 4, h, w) probability maps at the first member's network size, that the
    per-image confidence reads (metrics.confidence_candidates): each member under the 4 flip
    views, whatever test-time views the prediction itself uses."""
    cuda = predictor.device.type == "cuda"
    size = tuple(predictor.settings.size_hw)
    if isinstance(predictor, OnnxPredictor):
        return onnx_confidence_maps(predictor, [predictor.image(p.image, p.exif) for p in pairs])
    per_member = []
    for model, ckpt, _ in predictor.members:
        settings = ckpt_lib.input_settings(ckpt)
        x = images if settings == predictor.settings else torch.cat(
            [preprocess.eval_input(p.image, settings, p.exif)[0] for p in pairs])
        views = []
        for forward, inverse in predict.tta_views("flips", True):
            # in float32 on the CPU, whatever the prediction's precision: the confidence was
            # measured so (docs/evaluation.md)
            probs = predict.probabilities(model, forward(x), predictor.device,
                                          predictor.compute.mixed and cuda,
                                          predictor.compute.channels_last and cuda)
            views.append(inverse(probs[:, None])[:, 0].cpu().numpy())
        maps = np.stack(views, 1)
        if maps.shape[-2:] != size:  # a member of another size: brought to the first's
            maps = np.stack([[cv2.resize(v, size[::-1], interpolation=cv2.INTER_LINEAR)
                              for v in image] for image in maps])
        per_member.append(maps)
    return np.concatenate(per_member, 1)


def onnx_confidence_maps(predictor, probs):
    """confidence_maps of an exported file: its own maps (at the image's size) brought to the
    network size, as one member whose four views agree (the graph averages its views)."""
    size = tuple(predictor.settings.size_hw)
    return np.stack([[cv2.resize(prob, size[::-1], interpolation=cv2.INTER_AREA)] * 4
                     for prob in probs])


def split_probabilities(predictor, pairs, batch_size, workers, desc, confidence=False):
    """Yield (pair, probability map (see Predictor.batch), true mask as packed bits, its (h, w)),
    and with `confidence` the image's confidence_maps last.

    The images and masks go through load_dataset's Dataset exactly as validation during
    training reads them (same decode, resize and normalisation, from the checkpoint)."""
    options = load_dataset.LoaderOptions(workers=workers,
                                         pin_memory=predictor.device.type == "cuda")
    loader = load_dataset.make_loader(pairs, predictor.settings, batch_size, options,
                                      truth=True)
    by_id = {pair.id: pair for pair in pairs}
    with tqdm(total=len(pairs), desc=desc, unit="image") as bar:
        for batch in loader:
            if batch is None:
                continue
            images, _, ids, truths = batch
            probs = predictor.batch(images, [by_id[i] for i in ids])
            maps = None
            if confidence and isinstance(predictor, OnnxPredictor):
                maps = onnx_confidence_maps(predictor, probs)  # the graph's maps, not rerun
            elif confidence:
                maps = confidence_maps(predictor, images, [by_id[i] for i in ids])
            for j, (prob, pair_id, (bits, hw)) in enumerate(zip(probs, ids, truths)):
                item = (by_id[pair_id], prob, bits, hw)  # unpacked in the scoring threads
                yield item + (maps[j],) if confidence else item
                bar.update()


@dataclass
class Scoring:
    """How a split is scored: its name, the data folder it comes from, the loader's batch and
    workers, and post-processing."""
    split: str = "test"
    data: str = None
    batch_size: int = BATCH_SIZE
    workers: int = WORKERS
    postprocess: bool = False


def evaluate_split(predictor, pairs, out, threshold, scoring=None):
    """ISIC-format masks of every pair in <out>/masks, per_image.csv (scores and confidence),
    summary.json (means with their intervals, the confidence's AUROC, the review curve) and
    report.html with a thumbnail of every image in <out>/thumbnails."""
    scoring = scoring or Scoring()
    split, workers, postprocess = scoring.split, scoring.workers, scoring.postprocess
    mask_dir, thumb_dir = clear_evaluation(out, pairs)

    def score(pair, prob, bits, hw, maps):
        truth = preprocess.unpack_truth(bits, hw)
        pred = finish_mask(preprocess.prob_to_original(prob, truth.shape), threshold,
                           postprocess)
        write_mask(to_png_mask(pred), mask_dir / f"{pair.id}_segmentation.png")
        report.thumbnail(pair.image, truth, pred, thumb_dir / f"{pair.id}.jpg", pair.exif)
        return pair.id, metrics.confusion(pred, truth), \
            metrics.confidence_candidates(maps, threshold)

    rows, counts, exact = [], [], []
    probs = split_probabilities(predictor, pairs, scoring.batch_size, workers,
                                f"evaluate {split}", confidence=True)
    for pair_id, confusion, confidence in preprocess.ordered_map(score, probs, max(1, workers)):
        tp, fp, fn, tn = confusion
        counts.append(confusion)
        exact.append({**metrics.scores(*confusion),
                      **{f"confidence_{k}": v for k, v in confidence.items()}})
        total = tp + fp + fn + tn
        rows.append({"id": pair_id, **{k: round(v, 6) for k, v in
                                       metrics.scores(*confusion).items()},
                     "predicted_area": round((tp + fp) / total, 6),
                     "true_area": round((tp + fn) / total, 6),
                     **confidence_columns(confidence)})
    preprocess.write_csv(out / "per_image.csv", rows, ["id", *metrics.SCORE_NAMES,
                                                       "predicted_area", "true_area",
                                                       *CONFIDENCE_COLUMNS])
    return write_summary(predictor, out, (rows, counts, exact, len(pairs)), scoring, threshold)


def clear_evaluation(out, pairs):
    """(masks folder, thumbnails folder) of an evaluation in `out`, emptied of an earlier
    run's files: a stale mask would be scored as this run's."""
    mask_dir, thumb_dir = out / "masks", out / "thumbnails"
    mask_dir.mkdir(parents=True, exist_ok=True)
    thumb_dir.mkdir(exist_ok=True)
    old = list(mask_dir.glob("*_segmentation.png"))
    if old or (out / "summary.json").exists():
        print(f"note: replacing the earlier evaluation in {out} ({len(old)} masks)")
    for path in old + list(thumb_dir.glob("*.jpg")):
        path.unlink()
    if any(not load_dataset.ISIC_ID.search(p.id) for p in pairs):
        print("note: some ids hold no ISIC_<7 digits> id; the official scorer cannot match them")
    return mask_dir, thumb_dir


def write_summary(predictor, out, results, scoring, threshold):
    """summary.json and report.html of an evaluation; `results`: (the CSV's rows, each image's
    confusion counts, each image's exact scores and confidence candidates, the split's size)."""
    rows, counts, exact, split_size = results
    members = predictor.members
    summary = metrics.mean_scores(counts)
    summary.update(data=scoring.data, split=scoring.split, split_size=split_size,
                   checkpoint=[str(p) for _, _, p in members] if len(members) > 1
                   else str(predictor.path),
                   epoch=[c.get("epoch") for _, c, _ in members] if len(members) > 1
                   else predictor.ckpt.get("epoch"),
                   settings=[c["settings"] for _, c, _ in members] if len(members) > 1
                   else predictor.ckpt["settings"],
                   threshold=threshold, tta=predictor.tta, postprocess=scoring.postprocess,
                   **predictor.describe())
    summary.update(metrics.judge(exact))
    preprocess.write_text(out / "summary.json", json.dumps(summary, indent=1))
    level = predictor.ckpt.get("confidence", {}).get("level") if len(members) == 1 else None
    report.write_evaluation(out, rows, summary, f"{predictor.name()}: {scoring.split} split", [
        ("checkpoint", summary["checkpoint"]), ("epoch", summary["epoch"]),
        ("network", network_names(members)), ("settings", summary["settings"]),
        ("data", scoring.data), ("split", f"{scoring.split}, {len(rows)} images"),
        ("threshold", threshold), ("test-time views", predictor.tta),
        ("post-processing", "largest region filled" if scoring.postprocess else "none")], level)
    print("\n".join(report.judgement_lines(summary)))
    return summary


CONFIDENCE_COLUMNS = ("confidence", *(f"confidence_{name}" for name in metrics.CANDIDATES))


def confidence_columns(candidates):
    """Per-image CSV columns: the chosen confidence, then every candidate measured."""
    return {"confidence": round(candidates[metrics.CONFIDENCE], 6),
            **{f"confidence_{k}": round(v, 6) for k, v in candidates.items()}}


def threshold_counts(prob, truth, thresholds):
    """(len(thresholds), 4) confusion counts of one image for every threshold in one pass.

    Each pixel's level is how many thresholds lie at or below its probability; it is lesion at
    exactly those thresholds, so reversed cumulative counts of levels, for lesion and for
    background pixels, give TP and FP at every threshold at once."""
    t = np.asarray(thresholds, np.float32)
    k = len(t)
    level = np.searchsorted(t, prob.ravel(), side="right")
    level += (k + 1) * truth.ravel()  # lesion pixels counted in a second block of bins
    hist = np.bincount(level, minlength=2 * (k + 1)).reshape(2, k + 1)
    background, lesion = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]  # pixels with level > i
    n_lesion, n_background = hist[1].sum(), hist[0].sum()
    return np.stack([lesion, background, n_lesion - lesion, n_background - background], 1)


def threshold_analysis(predictor, pairs, out, scoring, thresholds=THRESHOLDS, best_by=BEST_BY):
    """Histogram of probabilities and mean scores against the threshold, all at original size;
    the best threshold by `best_by`."""
    split, batch_size, workers = scoring.split, scoring.batch_size, scoring.workers
    def count(pair, prob, bits, hw):
        truth = preprocess.unpack_truth(bits, hw)
        big = preprocess.prob_to_original(prob, truth.shape)
        bins = np.minimum((big * HISTOGRAM_BINS).astype(np.int64), HISTOGRAM_BINS - 1)
        hist = np.bincount(bins.ravel() + HISTOGRAM_BINS * truth.ravel(),
                           minlength=2 * HISTOGRAM_BINS).reshape(2, HISTOGRAM_BINS)
        return threshold_counts(big, truth, thresholds), hist

    per_image, hist = [], np.zeros((2, HISTOGRAM_BINS), np.int64)
    probs = split_probabilities(predictor, pairs, batch_size, workers, f"analyse {split}")
    for result in preprocess.ordered_map(count, probs, max(1, workers)):
        per_image.append(result[0])
        hist += result[1]
    if not per_image:
        raise UsageError(f"no readable image in the {split} split")
    per_image = np.stack(per_image)  # (images, thresholds, 4)
    curve = [{"threshold": t, **metrics.mean_scores(per_image[:, i])}
             for i, t in enumerate(thresholds)]
    out.mkdir(parents=True, exist_ok=True)
    report_replaced(out, ["threshold_curve.csv", "probability_histogram.csv",
                          "threshold_analysis.png"])
    preprocess.write_csv(out / "threshold_curve.csv", curve,
                         ["threshold", *metrics.SCORE_NAMES, "images"])
    edges = np.linspace(0, 1, HISTOGRAM_BINS + 1)
    preprocess.write_csv(out / "probability_histogram.csv",
              [{"bin_start": round(edges[i], 4), "bin_end": round(edges[i + 1], 4),
                "background_pixels": int(hist[0, i]), "lesion_pixels": int(hist[1, i])}
               for i in range(HISTOGRAM_BINS)],
              ["bin_start", "bin_end", "background_pixels", "lesion_pixels"])
    best = max(curve, key=lambda row: row[best_by])  # the first of equal scores, as np.argmax
    plot_analysis(hist, edges, curve, (best, best_by), out / "threshold_analysis.png",
                  f"{predictor.name()}: {split} split, {len(per_image)} images, "
                  f"pixels at original resolution")
    return curve, best


def plot_analysis(hist, edges, curve, best, path, title):
    """The histogram and the score curves; `best`: (the best row, the score it maximises)."""
    best, best_by = best
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for row, colour, label in ((0, "tab:blue", "background pixels"),
                               (1, "tab:red", "lesion pixels")):
        left.stairs(hist[row], edges, color=colour, label=label)
    left.set_yscale("log", nonpositive="clip")  # empty bins drop to the axis
    left.set(xlabel="predicted lesion probability", ylabel="pixels (log scale)",
             title="where the probabilities cluster", xlim=(0, 1), ylim=(0.8, None))
    left.legend()
    t = [row["threshold"] for row in curve]
    # thresholded Jaccard equals IoU wherever every image scores >= 0.65: dashed on top of
    # a thicker IoU line, so both stay visible where they coincide
    for key, label, style, width in (("iou", "mean IoU", "o-", 3.0),
                                     ("threshold_jaccard", "thresholded Jaccard", "s--", 1.2),
                                     ("dice", "mean Dice", "^-", 1.2)):
        right.plot(t, [row[key] for row in curve], style, ms=3, lw=width, label=label)
    right.axvline(best["threshold"], color="grey", ls="--", lw=1,
                  label=f"best {best_by}: {best['threshold']:g}")
    right.set(xlabel="threshold", ylabel="score", title="score against threshold", xlim=(0, 1))
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    preprocess.save_figure(fig, path)


# ----------------------------------------------------------------------------- variants

def variant_counts(predictor, pairs, threshold, batch_size=BATCH_SIZE, workers=WORKERS,
                   desc="variants"):
    """{(tta, postprocess): {id: (tp, fp, fn, tn)}} without and with test-time views (the
    predictor's, or flips) and without and with post-processing, at original size."""
    results = {}
    for tta in ("none", predictor.tta if predictor.tta != "none" else "flips"):
        variant = Predictor(predictor.members, predictor.compute, tta)

        def count(pair, prob, bits, hw):
            truth = preprocess.unpack_truth(bits, hw)
            big = preprocess.prob_to_original(prob, truth.shape)
            return pair.id, [metrics.confusion(finish_mask(big, threshold, post), truth)
                             for post in (False, True)]
        probs = split_probabilities(variant, pairs, batch_size, workers, f"{desc}, tta {tta}")
        for pair_id, (plain, post) in preprocess.ordered_map(count, probs, max(1, workers)):
            results.setdefault((tta, False), {})[pair_id] = plain
            results.setdefault((tta, True), {})[pair_id] = post
    return results


def variant_name(tta, post):
    return f"tta {tta}, " + ("largest region filled" if post else "no post-processing")


def print_variants(counts, title):
    print(title)
    for (tta, post), per_id in counts.items():
        means = metrics.mean_scores(per_id.values())
        print(f"  {variant_name(tta, post):<45} IoU {means['iou']:.4f}  thresholded Jaccard "
              f"{means['threshold_jaccard']:.4f}")


def cross_validation(model_dir, compute, args):
    """Each fold model scored on its own validation fold; per-fold means, their spread, and the
    pooled out-of-fold mean (per image), for each test-time and post-processing variant.

    The best model of a fold was chosen on that same fold, which flatters its score a little;
    `--last` scores each fold's last epoch instead (the resume state), which was not."""
    last = args.last
    given = [Path(p) for p in args.checkpoint or []]  # files, or folders to look in
    candidates = [p for where in (given or [Path(model_dir)])
                  for p in (sorted(where.glob("*.pth")) if where.is_dir() else [where])]
    files = [p for p in candidates if ckpt_lib.fold_of(p) is not None
             and ckpt_lib.is_resume_state(p) == last]
    if not files:
        where = " ".join(map(str, given)) if given else model_dir
        raise UsageError(f"no fold model (*_fold<I>{'_last' if last else ''}.pth) in "
                         f"{where}: train them with `python train_model.py --folds K "
                         f"--fold I`")
    out = Path(args.out) if args.out else Path(model_dir) / (
        "cross_validation_last" if last else "cross_validation")
    thumb_dir = out / "thumbnails"
    thumb_dir.mkdir(parents=True, exist_ok=True)
    for stale in thumb_dir.glob("*.jpg"):
        stale.unlink()
    rows, per_fold, scored = [], {}, {}
    for path in files:
        model, ckpt = predict.load_model(path, compute)
        fold = ckpt["settings"]["fold"]
        if fold is None:
            continue
        scored[str(fold)] = {"checkpoint": str(path), "epoch": ckpt.get("epoch"),
                                     "settings": ckpt["settings"], "train_pairs": len(
                                         load_split(ckpt, args.data, "train"))}
        threshold = args.threshold if args.threshold is not None else \
            ckpt["settings"]["threshold"]
        predictor = Predictor([(model, ckpt, path)], compute, args.tta)
        pairs = load_split(ckpt, args.data, "valid")
        counts = variant_counts(predictor, pairs, threshold, args.batch_size, args.workers,
                                f"fold {fold}")
        confidence = fold_confidence(predictor, pairs, threshold, thumb_dir, args)
        for variant, per_id in counts.items():
            per_fold.setdefault(variant, {})[fold] = metrics.mean_scores(per_id.values())
            rows += [{"fold": fold, "id": i, "tta": variant[0],
                      "postprocess": variant[1], **{k: round(v, 6) for k, v in
                                                    metrics.scores(*c).items()},
                      **confidence_columns(confidence[i])}
                     for i, c in per_id.items()]
    return summarise_folds(rows, per_fold, out, scored)


def fold_confidence(predictor, pairs, threshold, thumb_dir, args):
    """{id: confidence candidates} of a fold model on its own fold, and a thumbnail of each
    image with its mask without test-time views or post-processing (the report's variant)."""
    plain = Predictor(predictor.members, predictor.compute, "none")

    def judge(pair, prob, bits, hw, maps):
        truth = preprocess.unpack_truth(bits, hw)
        pred = finish_mask(preprocess.prob_to_original(prob, truth.shape), threshold, False)
        report.thumbnail(pair.image, truth, pred, thumb_dir / f"{pair.id}.jpg", pair.exif)
        return pair.id, metrics.confidence_candidates(maps, threshold)
    probs = split_probabilities(plain, pairs, args.batch_size, args.workers,
                                "confidence", confidence=True)
    return dict(preprocess.ordered_map(judge, probs, max(1, args.workers)))


def summarise_folds(rows, per_fold, out, scored):
    out.mkdir(parents=True, exist_ok=True)
    report_replaced(out, ["per_image.csv", "summary.json"])
    preprocess.write_csv(out / "per_image.csv", rows, ["fold", "id", "tta", "postprocess",
                                                       *metrics.SCORE_NAMES,
                                                       *CONFIDENCE_COLUMNS])
    summary = {"checkpoints": scored}
    for variant, folds in per_fold.items():
        mine = [r for r in rows if (r["tta"], r["postprocess"]) == variant]
        pooled = {k: float(np.mean([r[k] for r in mine])) for k in ("iou", "threshold_jaccard")}
        spread = {k: float(np.std([f[k] for f in folds.values()])) for k in pooled}
        summary[variant_name(*variant)] = {
            "images": len(mine), "folds": sorted(folds), "pooled": pooled,
            "fold_std": spread, "per_fold": {str(f): {k: folds[f][k] for k in pooled}
                                             for f in sorted(folds)}, **metrics.judge(mine)}
        ci = summary[variant_name(*variant)]["intervals"]
        print(f"{variant_name(*variant):<45} out-of-fold IoU {pooled['iou']:.4f} "
              f"[{ci['iou']['low']:.4f}, {ci['iou']['high']:.4f}] (folds ±{spread['iou']:.4f}), "
              f"thresholded Jaccard {pooled['threshold_jaccard']:.4f} "
              f"[{ci['threshold_jaccard']['low']:.4f}, {ci['threshold_jaccard']['high']:.4f}] "
              f"(±{spread['threshold_jaccard']:.4f}), {len(mine)} images, folds {sorted(folds)}")
    preprocess.write_text(out / "summary.json", json.dumps(summary, indent=1))
    print(f"saved {out / 'per_image.csv'}, {out / 'summary.json'}")
    plain = next((v for v in per_fold if v == ("none", False)), None)
    if plain is not None:  # the report shows the fold models' own masks, no views or filling
        block = summary[variant_name(*plain)]
        print(f"{variant_name(*plain)}:")
        print("\n".join(report.judgement_lines(block)))
        fold_list = ", ".join(f"{f}: {c['checkpoint']} (epoch {c['epoch']})"
                              for f, c in sorted(scored.items()))
        mine = [r for r in rows if (r["tta"], r["postprocess"]) == plain]
        models = Path(next(iter(scored.values()))["checkpoint"]).parent
        report.write_evaluation(out, mine, block, f"Cross-validation, out of fold: {models}", [
            ("checkpoints", fold_list),
            ("settings", next(iter(scored.values()))["settings"] if scored else None),
            ("split", f"each fold model on its own validation fold, {block['images']} images"),
            ("variant", variant_name(*plain))])
    return summary


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    settings_lib.add_flags(p, SETTINGS, globals())
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--image", nargs="+", metavar="PATH",
                      help="image files or folders to segment")
    mode.add_argument("--evaluate", action="store_true", help="score every image of --split")
    mode.add_argument("--threshold-analysis", action="store_true",
                      help="probability histogram and scores against the threshold on --split")
    mode.add_argument("--calibrate", action="store_true",
                      help="score --split (default valid) and store in the checkpoint the "
                           "confidence level that sets aside 90%% of its failures")
    mode.add_argument("--cross-validation", nargs="?", const=MODEL_DIR, default=None,
                      metavar="MODEL_DIR", help="score each fold model on its own fold")
    p.add_argument("--last", action="store_true",
                   help="with --cross-validation: each fold's last epoch, not its best")
    p.add_argument("--split", choices=["test", "valid", "train"], default=None,
                   help="the split to score (default: EVALUATE_SPLIT for --evaluate, "
                        "ANALYSIS_SPLIT for --threshold-analysis, valid for --calibrate)")
    p.add_argument("--data", default=None, help="data folder; default: the checkpoint's")
    p.add_argument("--out", default=None, help="output folder")
    return settings_lib.parse(p, SETTINGS, globals(), argv)[0]


def check_args(args):
    """Refuse, in one line, settings that cannot work together."""
    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        raise UsageError(f"THRESHOLD={args.threshold} must lie strictly between 0 and 1")
    if args.batch_size < 1 or args.workers < 0:
        raise UsageError(f"BATCH_SIZE={args.batch_size} must be >= 1 and "
                         f"WORKERS={args.workers} >= 0")
    if args.last and not args.cross_validation:
        raise UsageError("--last goes with --cross-validation; elsewhere name the files: "
                         "--checkpoint Model/*_fold?_last.pth")


def describe_models(predictor):
    """One line per model: its file, why it was picked, its network, size, epoch and data."""
    for _, member, path in predictor.members:
        run = member["settings"]
        print(f"checkpoint: {path} ({predictor.why}; {run['arch']} {run['encoder']} at "
              f"{'x'.join(map(str, run['image_size']))}, epoch {member.get('epoch')}, valid IoU "
              f"{float(member.get('valid_iou') or 0):.4f}, trained on {run['data']})")


def run(args):
    check_args(args)
    compute = device_lib.prepare(args.device, args.mixed_precision, args.channels_last,
                                 args.cudnn_benchmark)
    if args.cross_validation:
        cross_validation(args.cross_validation, compute, args)
        return 0
    predictor = load_predictor(args.checkpoint, args.model_dir, compute, args.tta)
    ckpt = predictor.ckpt
    threshold = args.threshold if args.threshold is not None else \
        float(ckpt["settings"]["threshold"])
    describe_models(predictor)
    if isinstance(predictor, OnnxPredictor):
        if args.threshold_analysis or args.calibrate:
            raise UsageError("--threshold-analysis and --calibrate need the .pth checkpoint(s)")
        print(predictor.runtime())
    post = "largest region filled" if args.postprocess else "none"
    print(f"device: {compute.device.type}; threshold {threshold:g}; test-time views: "
          f"{predictor.tta}; post-processing: {post}")
    if ckpt["settings"]["demo"]:
        print("note: this checkpoint was trained on generated demo data, not on real lesions")
    outputs = Path(args.out) if args.out else None
    # outputs stay beside the model that made them, in a folder of that model's (ensemble's)
    results = Path(predictor.path).parent / "evaluation" / ckpt_lib.results_name(
        [path for _, _, path in predictor.members])
    if args.threshold_analysis:
        analyse(predictor, args, threshold, outputs or results)
    elif args.calibrate:
        calibrate(predictor, args, threshold, outputs or results)
    elif args.evaluate:
        split = args.split or args.evaluate_split
        out = outputs or results / scored_folder(predictor, args.data, split)
        pairs = load_split(ckpt, args.data, split)
        print(f"scoring the {split} split of {data_dir_of(ckpt, args.data)}: "
              f"{load_dataset.pairs_word(len(pairs))}, into {out}")
        summary = evaluate_split(predictor, pairs, out, threshold, Scoring(
            split, str(data_dir_of(ckpt, args.data)), args.batch_size, args.workers,
            args.postprocess))
        print(f"{split} split, {summary['images']} images, threshold {threshold:g}: " + ", ".join(
            f"{name} {summary[name]:.4f}" for name in metrics.SCORE_NAMES)
            + " (intervals above)")
        print(f"masks: {out / 'masks'} (official score: isic-challenge-scoring segmentation "
              f"TRUTH_DIR {out / 'masks'}, with TRUTH_DIR a folder of the true masks of these "
              f"{summary['images']} images, as listed in per_image.csv); "
              f"{out / 'per_image.csv'}; {out / 'summary.json'}")
    else:
        if args.image:
            items = image_files(args.image)
            if not items:
                raise UsageError(f"no image found in {' '.join(args.image)}")
        else:
            pair = random.Random(args.seed).choice(load_split(ckpt, args.data, "test"))
            items = [(pair.image, pair.mask, pair.id)]
        predictions = Path(predictor.path).parent / "predictions" / ckpt_lib.results_name(
            [path for _, _, path in predictor.members])
        if not predict_files(predictor, items, outputs or predictions, threshold,
                             args.postprocess):
            raise UsageError("no image could be read")
    return 0


def calibrate(predictor, args, threshold, folder):
    """Evaluate the validation split and store, in the checkpoint, the confidence level below
    which 90% of its failed images fall: --image then flags masks below it."""
    if len(predictor.members) != 1:
        raise UsageError("--calibrate stores a level in one checkpoint: name one (an "
                         "ensemble's confidence differs from each member's)")
    split = args.split or "valid"
    if split == "test":
        print("note: calibrating on the test split leaves no untouched split to check it on")
    out = folder if args.out else folder / split
    summary = evaluate_split(predictor, load_split(predictor.ckpt, args.data, split), out,
                             threshold, Scoring(split, str(data_dir_of(predictor.ckpt, args.data)),
                                                args.batch_size, args.workers, args.postprocess))
    conf = summary["confidence"]
    if conf["level_90"] is None:
        raise UsageError(f"no failed image (IoU < {metrics.JACCARD_THRESHOLD:g}) among the "
                         f"{summary['images']} of the {split} split: no level to calibrate")
    path = Path(predictor.path)
    ckpt = ckpt_lib.load_checkpoint(path)  # as stored, not as this run may have changed it
    ckpt["confidence"] = {"name": metrics.CONFIDENCE, "level": conf["level_90"],
                          "threshold": float(threshold), "split": split,
                          "images": summary["images"], "failures": conf["failures"]}
    ckpt_lib.save_checkpoint(ckpt, path)
    print(f"stored in {path}: confidence level {conf['level_90']:.4f} ({metrics.CONFIDENCE}); "
          f"below it fall {conf['level_90_failures']} of the {conf['failures']} failed images "
          f"of the {split} split, and {conf['level_90_images']} of its {summary['images']} "
          f"images in all; --image warns below it")


def analyse(predictor, args, threshold, folder):
    """The threshold sweep, then the score with and without test-time views and
    post-processing at the threshold in use: the choices nnU-Net makes on validation data."""
    split = args.split or args.analysis_split
    out = folder if args.out else \
        folder / f"threshold_{scored_folder(predictor, args.data, split)}"
    pairs = load_split(predictor.ckpt, args.data, split)
    curve, best = threshold_analysis(
        predictor, pairs, out, Scoring(split, str(data_dir_of(predictor.ckpt, args.data)),
                                       args.batch_size, args.workers, args.postprocess),
        args.thresholds, args.best_by)
    at = min(curve, key=lambda row: abs(row["threshold"] - threshold))
    advice = f"; use it with --threshold {best['threshold']:g}" \
        if abs(best["threshold"] - threshold) > 1e-9 else " (the threshold in use)"
    print(f"best threshold on {split}: {best['threshold']:g} (mean {args.best_by} "
          f"{best[args.best_by]:.4f}; {at[args.best_by]:.4f} at {at['threshold']:g}){advice}")
    print(f"saved {out / 'threshold_analysis.png'}, {out / 'threshold_curve.csv'}, "
          f"{out / 'probability_histogram.csv'}")
    counts = variant_counts(predictor, pairs, threshold, args.batch_size, args.workers, split)
    print_variants(counts, f"{split} split at threshold {threshold:g}, per-image means:")


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (UsageError, CheckpointError, SettingError, load_dataset.SplitMismatch) as exc:
        sys.exit(f"error: {exc}")
    except torch.cuda.OutOfMemoryError:
        sys.exit(f"error: the GPU ran out of memory at BATCH_SIZE={args.batch_size}: lower it "
                 f"(--batch-size)")
    except OSError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        sys.exit("\ninterrupted")


if __name__ == "__main__":
    sys.exit(main())
