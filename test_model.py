"""Predict lesion masks with a checkpoint of train_model.py; score them as the ISIC challenge does.

    python test_model.py                            # a random test image -> mask + overlay figure
    python test_model.py --image a.jpg my_folder/   # your own images (no training data needed)
    python test_model.py --evaluate --split test    # every image of a split: ISIC masks + scores
    python test_model.py --threshold-analysis       # probability histogram, score vs threshold

Edit the constants below, or pass the matching flag.
"""
import argparse
import csv
import json
import os
import random
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# ----------------------------------------------------------------------------- settings
MODEL_DIR = "Model"                # the newest *.pth under it is the default checkpoint
CHECKPOINT = None                  # a checkpoint path; None: the newest best model in MODEL_DIR
PREDICTION_DIR = "Model/predictions"  # masks and overlays of single images go here
EVALUATION_DIR = "Model/evaluation"   # <this>/<split>/ for --evaluate, <this>/threshold_<split>/
EVALUATE_SPLIT = "test"            # split scored by --evaluate
ANALYSIS_SPLIT = "valid"           # split of --threshold-analysis (never tune on test)
THRESHOLD = None                   # None: the threshold stored in the checkpoint (train_model's)
THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 .. 0.95, the analysis grid
BEST_BY = "iou"                    # score the analysis maximises: "iou" or "threshold_jaccard"
HISTOGRAM_BINS = 100               # bins of the probability histogram over [0, 1]
BATCH_SIZE = 8                     # images per forward pass in --evaluate / --threshold-analysis
WORKERS = min(4, os.cpu_count() or 1)  # loader processes decoding images beside the model
SEED = None                        # seed of the random test image; None: a new one every run
DEVICE = "auto"                    # "auto" (CUDA when present), "cuda" or "cpu"
MIXED_PRECISION = True             # autocast on CUDA only; probabilities are taken in float32
CHANNELS_LAST = True               # channels_last memory format, on CUDA only
FIGURE_MAX_SIDE = 1024             # bigger images are shrunk to this for the overlay figure
# ---------------------------------------------------------------------------------------

import cv2  # noqa: E402  (the settings above come first, as a reader looks for them)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from tqdm import tqdm  # noqa: E402

import load_dataset  # noqa: E402
import metrics  # noqa: E402
import preprocess  # noqa: E402
import train_model  # noqa: E402

NOT_IMAGES = ("_segmentation", "_mask", "_superpixels", "_overlay")  # stems skipped in folders


class UsageError(ValueError):
    """A problem the user can fix; shown as one line."""


# ----------------------------------------------------------------------------- model

def find_checkpoint(model_dir):
    """The newest best-model checkpoint under model_dir (resume states *_last.pth excluded)."""
    found = [p for p in Path(model_dir).rglob("*.pth") if not p.name.endswith("_last.pth")]
    if not found:
        raise UsageError(f"no checkpoint (*.pth) under {model_dir}/: train one first with "
                         f"`python train_model.py` (or `python train_model.py --demo`), "
                         f"or pass --checkpoint PATH")
    return max(found, key=lambda p: p.stat().st_mtime)


def load_model(path, device):
    """(model in eval mode on device, checkpoint dict); CheckpointError for a file not ours."""
    ckpt = train_model.load_checkpoint(path)
    model = train_model.model_from_checkpoint(ckpt, path).to(device).eval()
    if device.type == "cuda" and CHANNELS_LAST:
        model = model.to(memory_format=torch.channels_last)
    return model, ckpt


@torch.inference_mode()
def predict_batch(model, images, device):
    """Probabilities (N, h, w) float32 numpy at network size for a (N, 3, H, W) batch."""
    model.eval()
    images = images.to(device, non_blocking=True)
    if device.type == "cuda" and CHANNELS_LAST:
        images = images.contiguous(memory_format=torch.channels_last)
    with train_model._autocast(device, MIXED_PRECISION):
        logits = model(images)
    return torch.sigmoid(logits.float())[:, 0].cpu().numpy()  # sigmoid in float32, not bf16


def predict(model, ckpt, image_path, device):
    """Probability map (float32) of one image at its original size (after EXIF orientation)."""
    tensor, original_hw = preprocess.eval_input(image_path, tuple(ckpt["image_size"]))
    return preprocess.prob_to_original(predict_batch(model, tensor, device)[0], original_hw)


def binarise(prob, threshold):
    # float32 on both sides, so --evaluate and --threshold-analysis cut at the same value
    return np.where(prob >= np.float32(threshold), 255, 0).astype(np.uint8)


# ----------------------------------------------------------------------------- files

def write_mask(mask, path):
    """0/255 mask as an 8-bit grayscale (mode L) PNG, the format the ISIC scorer reads."""
    tmp = path.with_name(path.stem + ".tmp.png")
    Image.fromarray(mask).save(tmp, compress_level=1)  # a 24 MP mask: fast beats small
    os.replace(tmp, path)


def read_truth(mask_path, hw):
    """True mask as bool at (h, w), binarised as the official scorer does (> 128)."""
    truth = preprocess.read_mask(mask_path)
    if truth.shape != tuple(hw):  # load_dataset accepts same-aspect masks and resizes them too
        truth = cv2.resize(truth, (hw[1], hw[0]), interpolation=cv2.INTER_NEAREST)
    return truth.astype(bool)


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
    beside = [p.with_name(f"{p.stem}_segmentation.png") for p in found]
    return [(p, m if m.is_file() else None, p.stem) for p, m in zip(found, beside)]


def load_split(ckpt, data, split):
    """Pairs of a split, found as the checkpoint's training run found them (or under --data)."""
    data_dir = Path(data or ckpt.get("data_dir") or train_model.DATA_DIR)
    if data or not ckpt.get("split_file"):
        split_file = load_dataset.work_dir(data_dir) / "split.json"  # where train_model.py puts it
    else:
        split_file = Path(ckpt["split_file"])
    found = load_dataset.scan(data_dir)
    if not any(found.splits.values()):
        where = "given by --data" if data else "recorded in the checkpoint"
        raise UsageError(f"no image/mask pairs under {data_dir} (the data folder {where}); "
                         f"pass --data DIR")
    pairs = load_dataset.split_pairs(found, seed=train_model.SEED,
                                     valid_fraction=train_model.VALID_FRACTION,
                                     test_fraction=train_model.TEST_FRACTION,
                                     split_file=split_file)[split]
    if not pairs:
        raise UsageError(f"the {split} split of {data_dir} is empty (no image/mask pairs); "
                         f"add data or pick another --split")
    return pairs


# ----------------------------------------------------------------------------- one image

def save_overlay(image_path, prob, pred, truth, path, title):
    """Image, probability map, and the predicted (and true) outline, shrunk for big images."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    h, w = prob.shape
    scale = min(1.0, FIGURE_MAX_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    side = FIGURE_MAX_SIDE
    image = cv2.resize(preprocess.read_image(image_path, min_hw=(side, side)), size,
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
    fig.savefig(path, dpi=90)
    plt.close(fig)


def predict_files(model, ckpt, items, device, out, threshold, checkpoint_path):
    """Mask PNG and overlay per (image, true mask or None, name); unreadable images are skipped."""
    out.mkdir(parents=True, exist_ok=True)
    done = 0
    for image_path, mask_path, name in items:
        try:
            prob = predict(model, ckpt, image_path, device)
        except (preprocess.ImageError, OSError) as exc:
            print(f"skipped {image_path}: {exc}", file=sys.stderr)
            continue
        pred = binarise(prob, threshold)
        mask_file, figure = out / f"{name}_segmentation.png", out / f"{name}_overlay.png"
        write_mask(pred, mask_file)
        truth, line = None, ""
        if mask_path is not None:
            try:
                truth = read_truth(mask_path, pred.shape)
                s = metrics.scores(*metrics.confusion(pred > 128, truth))
                line = f"; IoU {s['iou']:.4f}, Dice {s['dice']:.4f} against {mask_path}"
            except (preprocess.ImageError, OSError) as exc:
                print(f"true mask not used: {exc}", file=sys.stderr)
        save_overlay(image_path, prob, pred, truth, figure,
                     f"{image_path.name}  ({Path(checkpoint_path).name}, threshold {threshold:g})")
        print(f"{image_path} ({pred.shape[1]}x{pred.shape[0]}): mask {mask_file}, "
              f"overlay {figure}{line}")
        done += 1
    return done


# ----------------------------------------------------------------------------- a whole split

class SplitImages(Dataset):
    """(tensor at network size or None, original (h, w), index, error) per pair: decoding and
    resizing happen in the loader's workers, the sizes travel with each image."""

    def __init__(self, pairs, size_hw):
        self.pairs, self.size_hw = list(pairs), tuple(size_hw)

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        try:
            tensor, hw = preprocess.eval_input(self.pairs[i].image, self.size_hw)
            return tensor[0], hw, i, None
        except (preprocess.ImageError, OSError) as exc:
            return None, None, i, str(exc)


def collate_sizes(batch):
    """Stack the network-size tensors; keep original sizes, indices and errors as lists."""
    good = [item for item in batch if item[0] is not None]
    images = torch.stack([item[0] for item in good]) if good else None
    return images, [item[1:] for item in good], [item[2:] for item in batch if item[0] is None]


def split_probabilities(model, ckpt, pairs, device, batch_size, workers, desc):
    """Yield (pair, probability map at network size, original (h, w)) over a split."""
    loader = DataLoader(SplitImages(pairs, ckpt["image_size"]), batch_size=batch_size,
                        num_workers=workers, collate_fn=collate_sizes,
                        pin_memory=device.type == "cuda")
    with tqdm(total=len(pairs), desc=desc, unit="image") as bar:
        for images, good, failed in loader:
            for i, error in failed:
                tqdm.write(f"skipped {pairs[i].image}: {error}", file=sys.stderr)
                bar.update()
            if images is None:
                continue
            for prob, (hw, i, _) in zip(predict_batch(model, images, device), good):
                yield pairs[i], prob, hw
                bar.update()


def in_order(fn, items, threads):
    """fn over items in threads, results in order, a bounded number in flight: resizing to full
    size and PNG encoding (GIL released) then overlap the model instead of waiting for it."""
    with ThreadPoolExecutor(max(1, threads)) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.submit(fn, *item))
            if len(pending) > 2 * max(1, threads):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def evaluate_split(model, ckpt, pairs, device, out, threshold, batch_size=BATCH_SIZE,
                   workers=WORKERS, split="test", checkpoint_path=""):
    """ISIC-format masks of every pair in <out>/masks, per_image.csv and summary.json."""
    mask_dir = out / "masks"
    mask_dir.mkdir(parents=True, exist_ok=True)
    for old in mask_dir.glob("*_segmentation.png"):  # a stale mask would be scored as this run's
        old.unlink()
    if any(not load_dataset.ISIC_ID.search(p.id) for p in pairs):
        print("note: some ids hold no ISIC_<7 digits> id; the official scorer cannot match them")

    def score(pair, prob, hw):
        pred = binarise(preprocess.prob_to_original(prob, hw), threshold)
        write_mask(pred, mask_dir / f"{pair.id}_segmentation.png")
        try:
            return pair.id, metrics.confusion(pred > 128, read_truth(pair.mask, hw))
        except (preprocess.ImageError, OSError) as exc:  # the file changed after the scan
            tqdm.write(f"not scored: {exc}", file=sys.stderr)
            return pair.id, None

    rows, counts = [], []
    probs = split_probabilities(model, ckpt, pairs, device, batch_size, workers,
                                f"evaluate {split}")
    for pair_id, confusion in in_order(score, probs, workers):
        if confusion is None:
            continue
        tp, fp, fn, tn = confusion
        counts.append(confusion)
        total = tp + fp + fn + tn
        image_scores = metrics.scores(tp, fp, fn, tn)
        rows.append({"id": pair_id, **{k: round(v, 6) for k, v in image_scores.items()},
                     "predicted_area": round((tp + fp) / total, 6),
                     "true_area": round((tp + fn) / total, 6)})
    with open(out / "per_image.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", *metrics.SCORE_NAMES, "predicted_area",
                                               "true_area"])
        writer.writeheader()
        writer.writerows(rows)
    summary = metrics.mean_scores(counts)
    summary.update(split=split, checkpoint=str(checkpoint_path), threshold=threshold)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


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


def threshold_analysis(model, ckpt, pairs, device, out, thresholds=THRESHOLDS,
                       batch_size=BATCH_SIZE, workers=WORKERS, split="valid"):
    """Histogram of probabilities and mean scores against the threshold, all at original size."""
    def count(pair, prob, hw):
        big = preprocess.prob_to_original(prob, hw)
        try:
            truth = read_truth(pair.mask, hw)
        except (preprocess.ImageError, OSError) as exc:  # the file changed after the scan
            tqdm.write(f"not counted: {exc}", file=sys.stderr)
            return None
        bins = np.minimum((big * HISTOGRAM_BINS).astype(np.int64), HISTOGRAM_BINS - 1)
        hist = np.bincount(bins.ravel() + HISTOGRAM_BINS * truth.ravel(),
                           minlength=2 * HISTOGRAM_BINS).reshape(2, HISTOGRAM_BINS)
        return threshold_counts(big, truth, thresholds), hist

    per_image, hist = [], np.zeros((2, HISTOGRAM_BINS), np.int64)
    probs = split_probabilities(model, ckpt, pairs, device, batch_size, workers,
                                f"analyse {split}")
    for result in in_order(count, probs, workers):
        if result is not None:
            per_image.append(result[0])
            hist += result[1]
    if not per_image:
        raise UsageError(f"no readable image in the {split} split")
    per_image = np.stack(per_image)  # (images, thresholds, 4)
    curve = [{"threshold": t, **metrics.mean_scores(per_image[:, i])}
             for i, t in enumerate(thresholds)]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "threshold_curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["threshold", *metrics.SCORE_NAMES, "images"])
        writer.writeheader()
        writer.writerows(curve)
    edges = np.linspace(0, 1, HISTOGRAM_BINS + 1)
    with open(out / "probability_histogram.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["bin_start", "bin_end", "background_pixels", "lesion_pixels"])
        writer.writerows([round(edges[i], 4), round(edges[i + 1], 4), int(hist[0, i]),
                          int(hist[1, i])] for i in range(HISTOGRAM_BINS))
    best = max(curve, key=lambda row: row[BEST_BY])  # the first of equal scores, as np.argmax
    plot_analysis(hist, edges, curve, best, out / "threshold_analysis.png",
                  f"{split} split, {len(per_image)} images, pixels at original resolution")
    return curve, best


def plot_analysis(hist, edges, curve, best, path, title):
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
    for key, label in (("iou", "mean IoU"), ("threshold_jaccard", "thresholded Jaccard"),
                       ("dice", "mean Dice")):
        right.plot(t, [row[key] for row in curve], "o-", ms=3, label=label)
    right.axvline(best["threshold"], color="grey", ls="--", lw=1,
                  label=f"best {BEST_BY}: {best['threshold']:g}")
    right.set(xlabel="threshold", ylabel="score", title="score against threshold", xlim=(0, 1))
    right.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=CHECKPOINT,
                   help="checkpoint; default: the newest in --model-dir")
    p.add_argument("--model-dir", default=MODEL_DIR, help="where to look for the newest checkpoint")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--image", nargs="+", metavar="PATH",
                      help="image files or folders to segment")
    mode.add_argument("--evaluate", action="store_true", help="score every image of --split")
    mode.add_argument("--threshold-analysis", action="store_true",
                      help="probability histogram and scores against the threshold on --split")
    p.add_argument("--split", choices=["test", "valid", "train"], default=None,
                   help=f"{EVALUATE_SPLIT} for --evaluate, {ANALYSIS_SPLIT} for the analysis")
    p.add_argument("--data", default=None, help="data folder; default: the checkpoint's")
    p.add_argument("--out", default=None, help="output folder")
    p.add_argument("--threshold", type=float, default=THRESHOLD,
                   help="lesion probability cut; default: the checkpoint's")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--workers", type=int, default=WORKERS)
    p.add_argument("--seed", type=int, default=SEED, help="seed of the random test image")
    p.add_argument("--device", default=DEVICE, choices=["auto", "cpu", "cuda"])
    return p.parse_args(argv)


def run(args):
    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        raise UsageError(f"THRESHOLD={args.threshold} must lie strictly between 0 and 1")
    if args.batch_size < 1 or args.workers < 0:
        raise UsageError(f"BATCH_SIZE={args.batch_size} must be >= 1 and "
                         f"WORKERS={args.workers} >= 0")
    device = train_model.pick_device(args.device)
    path = Path(args.checkpoint) if args.checkpoint else find_checkpoint(args.model_dir)
    model, ckpt = load_model(path, device)
    threshold = args.threshold if args.threshold is not None else float(ckpt.get("threshold", 0.5))
    print(f"checkpoint: {path} (FPN {ckpt['encoder']}, epoch {ckpt.get('epoch')}, valid IoU "
          f"{float(ckpt.get('valid_iou') or 0):.4f}); device: {device.type}; "
          f"threshold {threshold:g}")
    if ckpt.get("demo"):
        print("note: this checkpoint was trained on generated demo data, not on real lesions")

    if args.threshold_analysis:
        split = args.split or ANALYSIS_SPLIT
        out = Path(args.out or Path(EVALUATION_DIR) / f"threshold_{split}")
        curve, best = threshold_analysis(model, ckpt, load_split(ckpt, args.data, split), device,
                                         out, THRESHOLDS, args.batch_size, args.workers, split)
        at = min(curve, key=lambda row: abs(row["threshold"] - threshold))
        print(f"best threshold on {split}: {best['threshold']:g} (mean {BEST_BY} "
              f"{best[BEST_BY]:.4f}; {at[BEST_BY]:.4f} at {at['threshold']:g}); use it with "
              f"--threshold {best['threshold']:g}")
        print(f"saved {out / 'threshold_analysis.png'}, {out / 'threshold_curve.csv'}, "
              f"{out / 'probability_histogram.csv'}")
    elif args.evaluate:
        split = args.split or EVALUATE_SPLIT
        out = Path(args.out or Path(EVALUATION_DIR) / split)
        summary = evaluate_split(model, ckpt, load_split(ckpt, args.data, split), device, out,
                                 threshold, args.batch_size, args.workers, split, path)
        print(f"{split} split, {summary['images']} images, threshold {threshold:g}: " + ", ".join(
            f"{name} {summary[name]:.4f}" for name in metrics.SCORE_NAMES))
        print(f"masks: {out / 'masks'} (official score: isic-challenge-scoring segmentation "
              f"TRUTH_DIR {out / 'masks'}); {out / 'per_image.csv'}; {out / 'summary.json'}")
    else:
        out = Path(args.out or PREDICTION_DIR)
        if args.image:
            items = image_files(args.image)
            if not items:
                raise UsageError(f"no image found in {' '.join(args.image)}")
        else:
            pair = random.Random(args.seed).choice(load_split(ckpt, args.data, "test"))
            items = [(pair.image, pair.mask, pair.id)]
        if not predict_files(model, ckpt, items, device, out, threshold, path):
            raise UsageError("no image could be read")
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (UsageError, train_model.CheckpointError, train_model.SettingError,
            load_dataset.SplitMismatch) as exc:
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
