"""Scoring a split: every image's probability map brought back to its true mask's size, cut at
the threshold, scored with the registry of metrics.py; the masks in the official scorer's
format, per_image.csv, summary.json and report.html. --evaluate, --calibrate,
--threshold-analysis and --cross-validation of test_model.py all score through here, and
the confidence of each mask comes from the map the prediction made (no pass of its own).
"""
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

import checkpoint as ckpt_lib
import load_dataset
import metrics
import preprocess
import report
from predict import OnnxPredictor, Predictor, UsageError, load_model

HISTOGRAM_BINS = 100  # bins of the probability histogram over [0, 1]
JSON_WIDTH = 100      # summary.json: a list or table that fits this many characters is one line


# ----------------------------------------------------------------------------- files

def to_png_mask(pred):
    """bool mask -> 0/255 uint8, as the ISIC scorer reads it."""
    return np.where(pred, 255, 0).astype(np.uint8)


def write_mask(mask, path):
    """0/255 mask as an 8-bit grayscale (mode L) PNG, the format the ISIC scorer reads."""
    with preprocess.atomic_write(path) as tmp:
        # a 24 MP mask: fast beats small
        Image.fromarray(mask).save(tmp, format="PNG", compress_level=1)


def compact_json(value, indent=0):
    """JSON text with one key per line, except that a list or table that fits JSON_WIDTH
    characters stays on one line: a summary a person reads top to bottom."""
    flat = json.dumps(value)
    if not isinstance(value, (dict, list)) or not value or indent + len(flat) <= JSON_WIDTH:
        return flat
    pad = " " * (indent + 1)
    if isinstance(value, dict):
        inner = [f"{pad}{json.dumps(k)}: {compact_json(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(inner) + "\n" + " " * indent + "}"
    inner = [pad + compact_json(v, indent + 1) for v in value]
    return "[\n" + ",\n".join(inner) + "\n" + " " * indent + "]"


def report_replaced(out, names):
    """One line when this run overwrites results an earlier run left in `out`."""
    replaced = [n for n in names if (out / n).exists()]
    if replaced:
        print(f"note: replacing {len(replaced)} earlier result file(s) in {out}")


# ----------------------------------------------------------------------------- the split

def data_dir_of(ckpt, data):
    """The data folder to score: --data, else the one the checkpoint was trained on."""
    return Path(data or ckpt["settings"]["data"])


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


def scored_folder(predictor, data, split):
    """<split>, or <split>_<data folder name> for data other than the checkpoint's own: the
    results of two datasets never share a folder."""
    own = predictor.ckpt["settings"]["data"]
    if data is None or (own and Path(data).resolve() == Path(own).resolve()):
        return split
    return f"{split}_{Path(data).resolve().name}"


# ----------------------------------------------------------------------------- prediction

def confidence_of(prob, size_hw, threshold):
    """metrics.confidence of the map the prediction made, at the first member's network size:
    a map of the loader's batch as Predictor.batch gives it (an ensemble of several sizes: a
    tuple, each brought to that size and averaged), or an exported file's map at the image's
    size, shrunk to it."""
    def at_size(p):
        p = np.asarray(p, np.float32)
        return p if p.shape == tuple(size_hw) else cv2.resize(p, tuple(size_hw)[::-1],
                                                               interpolation=cv2.INTER_AREA)
    small = np.mean([at_size(p) for p in prob], 0) if isinstance(prob, tuple) else at_size(prob)
    return metrics.confidence(small, threshold)


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


def image_prediction(predictor, image_path, exif=True, hw=None):
    """(probability map at the image's size as read, or at `hw`; the map the confidence
    reads) of one image, by the predictor's members and views, one forward pass per view."""
    if isinstance(predictor, OnnxPredictor):
        prob = predictor.image(image_path, exif, hw)
        return prob, prob
    x, read_hw = preprocess.eval_input(image_path, predictor.settings, exif)
    return network_prediction(predictor, x, image_path, exif, hw or read_hw)


def network_prediction(predictor, x, image_path, exif, hw):
    """(probability map at `hw`, the map at network size) of a PyTorch predictor for the
    image's network input `x` (preprocess.network_input; an ensemble member of other input
    settings reads the image again from `image_path`)."""
    pair = load_dataset.Pair(id=Path(image_path).stem, image=Path(image_path), exif=exif)
    small = predictor.batch(x, [pair])[0]
    return preprocess.prob_to_original(small, hw), small


def split_probabilities(predictor, pairs, batch_size, workers, desc):
    """Yield (pair, probability map (see Predictor.batch), true mask as packed bits, its (h, w)).

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
            for prob, pair_id, (bits, hw) in zip(probs, ids, truths):
                yield by_id[pair_id], prob, bits, hw  # unpacked in the scoring threads
                bar.update()


# ----------------------------------------------------------------------------- --evaluate

@dataclass
class Scoring:
    """How a split is scored: its name, the data folder it comes from, the loader's batch and
    workers, and post-processing."""
    split: str = "test"
    data: str = None
    batch_size: int = 8
    workers: int = 1
    postprocess: bool = False


def evaluate_split(predictor, pairs, out, threshold, scoring=None):
    """ISIC-format masks of every pair in <out>/masks, per_image.csv (every registry metric and
    the confidence), summary.json (means with their intervals, the confidence's AUROC, the
    review curve) and report.html with a thumbnail of every image in <out>/thumbnails."""
    scoring = scoring or Scoring()
    mask_dir, thumb_dir = clear_evaluation(out, pairs)
    size = predictor.settings.size_hw

    def score(pair, prob, bits, hw):
        truth = preprocess.unpack_truth(bits, hw)
        pred, scores = metrics.score_at_original(prob, truth, threshold, scoring.postprocess)
        write_mask(to_png_mask(pred), mask_dir / f"{pair.id}_segmentation.png")
        report.thumbnail(pair.image, truth, pred, thumb_dir / f"{pair.id}.jpg", pair.exif)
        return {"id": pair.id, **scores, "predicted_area": np.count_nonzero(pred) / pred.size,
                "true_area": np.count_nonzero(truth) / truth.size,
                "confidence": confidence_of(prob, size, threshold)}

    probs = split_probabilities(predictor, pairs, scoring.batch_size, scoring.workers,
                                f"evaluate {scoring.split}")
    rows = list(preprocess.ordered_map(score, probs, max(1, scoring.workers)))
    preprocess.write_csv(out / "per_image.csv", [rounded(r) for r in rows],
                         ["id", *metrics.names(), "predicted_area", "true_area", "confidence"])
    return write_summary(predictor, out, (rows, len(pairs)), scoring, threshold)


def rounded(row, digits=6):
    return {k: round(v, digits) if isinstance(v, float) else v for k, v in row.items()}


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


def network_names(members):
    """"FPN resnet18" of each member (one line for an ensemble)."""
    return ", ".join(f"{c['settings']['arch']} {c['settings']['encoder']}" for _, c, _ in members)


def write_summary(predictor, out, results, scoring, threshold):
    """summary.json and report.html of an evaluation; `results`: (per-image rows with exact
    values, the split's size)."""
    rows, split_size = results
    members, one = predictor.members, len(predictor.members) == 1
    summary = metrics.means(rows, metrics.names())
    summary.update(data=scoring.data, split=scoring.split, split_size=split_size,
                   checkpoint=str(predictor.path) if one else [str(p) for _, _, p in members],
                   epoch=predictor.ckpt.get("epoch") if one else
                   [c.get("epoch") for _, c, _ in members],
                   threshold=threshold, tta=predictor.tta, postprocess=scoring.postprocess,
                   nsd_tolerance_px=metrics.NSD_TOLERANCE, **predictor.describe())
    summary.update(metrics.judge(rows))
    summary["settings"] = predictor.ckpt["settings"] if one else \
        [c["settings"] for _, c, _ in members]
    preprocess.write_text(out / "summary.json", compact_json(summary) + "\n")
    level = predictor.ckpt.get("confidence", {}).get("level") if one else None
    report.write_evaluation(out, rows, summary, f"{predictor.name()}: {scoring.split} split", [
        ("checkpoint", summary["checkpoint"]), ("epoch", summary["epoch"]),
        ("network", network_names(members)), ("settings", summary["settings"]),
        ("data", scoring.data), ("split", f"{scoring.split}, {len(rows)} images"),
        ("threshold", threshold), ("test-time views", predictor.tta),
        ("post-processing", "largest region filled" if scoring.postprocess else "none")], level)
    print("\n".join(report.judgement_lines(summary)))
    return summary


# ----------------------------------------------------------------------------- thresholds

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


def threshold_analysis(predictor, pairs, out, scoring, grid):
    """Histogram of probabilities and mean count scores against the threshold, all at
    original size; the best threshold by grid[1]. grid: (thresholds, score to maximise)."""
    thresholds, best_by = grid

    def count(pair, prob, bits, hw):
        truth = preprocess.unpack_truth(bits, hw)
        big = preprocess.prob_to_original(prob, truth.shape)
        bins = np.minimum((big * HISTOGRAM_BINS).astype(np.int64), HISTOGRAM_BINS - 1)
        hist = np.bincount(bins.ravel() + HISTOGRAM_BINS * truth.ravel(),
                           minlength=2 * HISTOGRAM_BINS).reshape(2, HISTOGRAM_BINS)
        return threshold_counts(big, truth, thresholds), hist

    per_image, hist = [], np.zeros((2, HISTOGRAM_BINS), np.int64)
    probs = split_probabilities(predictor, pairs, scoring.batch_size, scoring.workers,
                                f"analyse {scoring.split}")
    for result in preprocess.ordered_map(count, probs, max(1, scoring.workers)):
        per_image.append(result[0])
        hist += result[1]
    if not per_image:
        raise UsageError(f"no readable image in the {scoring.split} split")
    per_image = np.stack(per_image)  # (images, thresholds, 4)
    curve = [{"threshold": t, **metrics.mean_scores(per_image[:, i])}
             for i, t in enumerate(thresholds)]
    out.mkdir(parents=True, exist_ok=True)
    report_replaced(out, ["threshold_curve.csv", "probability_histogram.csv",
                          "threshold_analysis.png"])
    preprocess.write_csv(out / "threshold_curve.csv", curve,
                         ["threshold", *metrics.mean_scores([]).keys()])
    edges = np.linspace(0, 1, HISTOGRAM_BINS + 1)
    preprocess.write_csv(out / "probability_histogram.csv",
                         [{"bin_start": round(edges[i], 4), "bin_end": round(edges[i + 1], 4),
                           "background_pixels": int(hist[0, i]),
                           "lesion_pixels": int(hist[1, i])} for i in range(HISTOGRAM_BINS)],
                         ["bin_start", "bin_end", "background_pixels", "lesion_pixels"])
    best = max(curve, key=lambda row: row[best_by])  # the first of equal scores, as np.argmax
    report.plot_analysis(hist, edges, curve, (best, best_by), out / "threshold_analysis.png",
                         f"{predictor.name()}: {scoring.split} split, {len(per_image)} images, "
                         f"pixels at original resolution")
    return curve, best


# ----------------------------------------------------------------------------- variants

def variant_scores(predictor, pairs, threshold, scoring, thumbnails=None, only=None):
    """{(tta, postprocess): {id: scores and confidence}} without and with test-time views
    (the predictor's, or flips) and without and with post-processing, at original size (the
    registry's metrics, or those named in `only`); with `thumbnails` (a folder), each image's
    thumbnail of the plain variant in it."""
    results = {}
    size = predictor.settings.size_hw
    for tta in ("none", predictor.tta if predictor.tta != "none" else "flips"):
        variant = Predictor(predictor.members, predictor.compute, tta)

        def score(pair, prob, bits, hw):
            truth = preprocess.unpack_truth(bits, hw)
            confidence, out = confidence_of(prob, size, threshold), {}
            for post in (False, True):
                pred, scores = metrics.score_at_original(prob, truth, threshold, post, only)
                out[post] = {**scores, "confidence": confidence}
                if thumbnails is not None and tta == "none" and not post:
                    report.thumbnail(pair.image, truth, pred, thumbnails / f"{pair.id}.jpg",
                                     pair.exif)
            return pair.id, out
        probs = split_probabilities(variant, pairs, scoring.batch_size, scoring.workers,
                                    f"{scoring.split}, tta {tta}")
        for pair_id, by_post in preprocess.ordered_map(score, probs, max(1, scoring.workers)):
            for post, scores in by_post.items():
                results.setdefault((tta, post), {})[pair_id] = scores
    return results


def variant_name(tta, post):
    return f"tta {tta}, " + ("largest region filled" if post else "no post-processing")


def print_variants(scored, title):
    print(title)
    for (tta, post), per_id in scored.items():
        means = metrics.means(per_id.values(), ["iou", "threshold_jaccard"])
        print(f"  {variant_name(tta, post):<45} IoU {means['iou']:.4f}  thresholded Jaccard "
              f"{means['threshold_jaccard']:.4f}")


# ----------------------------------------------------------------------------- folds

def fold_models(model_dir, given, last):
    """The fold models to score: the *_fold<I>.pth (with `last`, *_fold<I>_last.pth) files
    among `given` (files, or folders to look in), else in model_dir."""
    given = [Path(p) for p in given or []]
    candidates = [p for where in (given or [Path(model_dir)])
                  for p in (sorted(where.glob("*.pth")) if where.is_dir() else [where])]
    files = [p for p in candidates if ckpt_lib.fold_of(p) is not None
             and ckpt_lib.is_resume_state(p) == last]
    if not files:
        where = " ".join(map(str, given)) if given else model_dir
        raise UsageError(f"no fold model (*_fold<I>{'_last' if last else ''}.pth) in "
                         f"{where}: train them with `python train_model.py --folds K "
                         f"--fold I`")
    return files


def cross_validate(files, compute, out, options):
    """Each fold model scored on its own validation fold, for each test-time and
    post-processing variant; `options`: tta, threshold, data, batch_size, workers (the
    command line's). Writes per_image.csv, summary.json and report.html to `out`."""
    thumb_dir = out / "thumbnails"
    thumb_dir.mkdir(parents=True, exist_ok=True)
    for stale in thumb_dir.glob("*.jpg"):
        stale.unlink()
    rows, scored = [], {}
    for path in files:
        model, ckpt = load_model(path, compute)
        fold = ckpt["settings"]["fold"]
        if fold is None:
            continue
        scored[str(fold)] = {"checkpoint": str(path), "epoch": ckpt.get("epoch"),
                             "settings": ckpt["settings"], "train_pairs": len(
                                 load_split(ckpt, options.data, "train"))}
        threshold = options.threshold if options.threshold is not None else \
            ckpt["settings"]["threshold"]
        predictor = Predictor([(model, ckpt, path)], compute, options.tta)
        variants = variant_scores(predictor, load_split(ckpt, options.data, "valid"), threshold,
                                  Scoring(f"fold {fold}", None, options.batch_size,
                                          options.workers), thumb_dir)
        rows += [{"fold": fold, "id": i, "tta": tta, "postprocess": post, **s}
                 for (tta, post), per_id in variants.items() for i, s in per_id.items()]
    return summarise_folds(rows, out, scored)


def fold_block(mine):
    """summary.json's block of one variant: pooled means of every metric, the spread and the
    values of the fold means of IoU and thresholded Jaccard, intervals, confidence."""
    folds = sorted({r["fold"] for r in mine})
    keys = ("iou", "threshold_jaccard")
    per_fold = {f: metrics.means([r for r in mine if r["fold"] == f], keys) for f in folds}
    return {"images": len(mine), "folds": folds, "pooled": metrics.means(mine, metrics.names()),
            "fold_std": {k: float(np.std([per_fold[f][k] for f in folds])) for k in keys},
            "per_fold": {str(f): {k: per_fold[f][k] for k in keys} for f in folds},
            **metrics.judge(mine)}


def summarise_folds(rows, out, scored):
    out.mkdir(parents=True, exist_ok=True)
    report_replaced(out, ["per_image.csv", "summary.json"])
    preprocess.write_csv(out / "per_image.csv", [rounded(r) for r in rows],
                         ["fold", "id", "tta", "postprocess", *metrics.names(), "confidence"])
    summary = {"checkpoints": scored}
    for variant in dict.fromkeys((r["tta"], r["postprocess"]) for r in rows):
        block = fold_block([r for r in rows if (r["tta"], r["postprocess"]) == variant])
        summary[variant_name(*variant)] = block
        ci, pooled, spread = block["intervals"], block["pooled"], block["fold_std"]
        print(f"{variant_name(*variant):<45} out-of-fold IoU {pooled['iou']:.4f} "
              f"[{ci['iou']['low']:.4f}, {ci['iou']['high']:.4f}] (folds ±{spread['iou']:.4f}), "
              f"thresholded Jaccard {pooled['threshold_jaccard']:.4f} "
              f"[{ci['threshold_jaccard']['low']:.4f}, {ci['threshold_jaccard']['high']:.4f}] "
              f"(±{spread['threshold_jaccard']:.4f}), {block['images']} images, "
              f"folds {block['folds']}")
    preprocess.write_text(out / "summary.json", compact_json(summary) + "\n")
    print(f"saved {out / 'per_image.csv'}, {out / 'summary.json'}")
    plain = variant_name("none", False)
    if plain in summary:  # the report shows the fold models' own masks, no views or filling
        fold_report(out, [r for r in rows if (r["tta"], r["postprocess"]) == ("none", False)],
                    summary[plain], scored)
    return summary


def fold_report(out, rows, block, scored):
    print(f"{variant_name('none', False)}:")
    print("\n".join(report.judgement_lines(block)))
    fold_list = ", ".join(f"{f}: {c['checkpoint']} (epoch {c['epoch']})"
                          for f, c in sorted(scored.items()))
    models = Path(next(iter(scored.values()))["checkpoint"]).parent
    report.write_evaluation(out, rows, {**block, **block["pooled"]},
                            f"Cross-validation, out of fold: {models}", [
        ("checkpoints", fold_list), ("settings", next(iter(scored.values()))["settings"]),
        ("split", f"each fold model on its own validation fold, {block['images']} images"),
        ("variant", variant_name("none", False))])
