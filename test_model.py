"""Predict lesion masks with a checkpoint of train_model.py; score them as the ISIC challenge does.

    python test_model.py                            # a random test image -> mask + overlay figure
    python test_model.py --image a.jpg my_folder/   # your own images (no training data needed)
    python test_model.py --evaluate --split test    # every image of a split: ISIC masks + scores
    python test_model.py --threshold-analysis       # probability histogram, score vs threshold

Edit the constants below, or pass the matching flag.
"""
import argparse
import os
import random
import re
import sys
from pathlib import Path

import torch

import checkpoint as ckpt_lib
import device as device_lib
import evaluate
import load_dataset
import metrics
import predict
import preprocess
import report
import settings as settings_lib
from checkpoint import CheckpointError
from evaluate import Scoring, data_dir_of, load_split, report_replaced
from predict import OnnxPredictor, UsageError, load_predictor
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

NOT_IMAGES = ("_segmentation", "_mask", "_superpixels", "_overlay")  # stems skipped in folders


# ----------------------------------------------------------------------------- files

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


# ----------------------------------------------------------------------------- one image

def predict_files(predictor, items, out, threshold, postprocess=False):
    """Mask PNG and overlay per (image, true mask or None, name); unreadable images are skipped.

    With no true mask, the mask is written in the orientation a viewer shows (EXIF applied);
    with one, it has the true mask's shape (the mask decides the orientation, as in training)."""
    out.mkdir(parents=True, exist_ok=True)
    report_replaced(out, [f"{name}_{kind}.png" for _, _, name in items
                          for kind in ("segmentation", "overlay")])
    done, level = 0, evaluate.calibrated_level(predictor, threshold)
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
            prob, small = evaluate.image_prediction(predictor, image_path, exif,
                                                    truth.shape if truth is not None else None)
        except (preprocess.ImageError, OSError) as exc:
            print(f"skipped {load_dataset.describe_error(exc, image_path)}", file=sys.stderr)
            continue
        pred = metrics.predicted_mask(prob, prob.shape, threshold, postprocess)
        confidence = evaluate.confidence_of(small, predictor.settings.size_hw, threshold)
        mask_file, figure = out / f"{name}_segmentation.png", out / f"{name}_overlay.png"
        evaluate.write_mask(evaluate.to_png_mask(pred), mask_file)
        line = ""
        if truth is not None:
            s = metrics.image_scores(pred, truth)
            line = f"; IoU {s['iou']:.4f}, Dice {s['dice']:.4f}, HD95 {s['hd95']:.1f} px " \
                   f"against {mask_path}"
        report.save_overlay(image_path, prob, pred, truth, figure,
                            f"{image_path.name}  ({predictor.name()}, threshold {threshold:g})",
                            exif)
        print(f"{image_path} ({pred.shape[1]}x{pred.shape[0]}): mask {mask_file}, "
              f"overlay {figure}{line}; confidence {confidence:.3f}")
        if level is not None and confidence < level:
            print(f"low confidence: review this mask ({confidence:.3f} < {level:.3f}, the level "
                  f"that set aside 90% of the failures on validation)")
        done += 1
    return done


def read_truth_beside(mask_path):
    try:
        return preprocess.read_mask(mask_path) > 0
    except (preprocess.ImageError, OSError) as exc:
        print(f"true mask not used: {exc}", file=sys.stderr)
        return None


# ----------------------------------------------------------------------------- folds

def cross_validation(model_dir, compute, args):
    """Each fold model scored on its own validation fold; per-fold means, their spread, and the
    pooled out-of-fold mean (per image), for each test-time and post-processing variant.

    The best model of a fold was chosen on that same fold, which flatters its score a little;
    `--last` scores each fold's last epoch instead (the resume state), which was not."""
    files = evaluate.fold_models(model_dir, args.checkpoint, args.last)
    out = Path(args.out) if args.out else Path(model_dir) / (
        "cross_validation_last" if args.last else "cross_validation")
    return evaluate.cross_validate(files, compute, out, args)


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
        score_split(predictor, args, threshold, outputs or results)
    else:
        predictions = Path(predictor.path).parent / "predictions" / ckpt_lib.results_name(
            [path for _, _, path in predictor.members])
        if not predict_files(predictor, chosen_images(args, ckpt), outputs or predictions,
                             threshold, args.postprocess):
            raise UsageError("no image could be read")
    return 0


def chosen_images(args, ckpt):
    """(image, true mask or None, name) of --image's files, else of a random test image."""
    if args.image:
        items = image_files(args.image)
        if not items:
            raise UsageError(f"no image found in {' '.join(args.image)}")
        return items
    pair = random.Random(args.seed).choice(load_split(ckpt, args.data, "test"))
    return [(pair.image, pair.mask, pair.id)]


def score_split(predictor, args, threshold, results):
    """--evaluate: every image of the split, scored into its folder of `results`."""
    ckpt, split = predictor.ckpt, args.split or args.evaluate_split
    out = Path(args.out) if args.out else \
        results / evaluate.scored_folder(predictor, args.data, split)
    pairs = load_split(ckpt, args.data, split)
    print(f"scoring the {split} split of {data_dir_of(ckpt, args.data)}: "
          f"{load_dataset.pairs_word(len(pairs))}, into {out}")
    summary = evaluate.evaluate_split(predictor, pairs, out, threshold, Scoring(
        split, str(data_dir_of(ckpt, args.data)), args.batch_size, args.workers,
        args.postprocess))
    print(f"{split} split, {summary['images']} images, threshold {threshold:g}: " + ", ".join(
        f"{name} {summary[name]:.4f}" for name in metrics.names()) + " (intervals above)")
    print(f"masks: {out / 'masks'} (official score: isic-challenge-scoring segmentation "
          f"TRUTH_DIR {out / 'masks'}, with TRUTH_DIR a folder of the true masks of these "
          f"{summary['images']} images, as listed in per_image.csv); "
          f"{out / 'per_image.csv'}; {out / 'summary.json'}")


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
    summary = evaluate.evaluate_split(
        predictor, load_split(predictor.ckpt, args.data, split), out, threshold,
        Scoring(split, str(data_dir_of(predictor.ckpt, args.data)), args.batch_size,
                args.workers, args.postprocess))
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
        folder / f"threshold_{evaluate.scored_folder(predictor, args.data, split)}"
    pairs = load_split(predictor.ckpt, args.data, split)
    scoring = Scoring(split, str(data_dir_of(predictor.ckpt, args.data)), args.batch_size,
                      args.workers, args.postprocess)
    curve, best = evaluate.threshold_analysis(predictor, pairs, out, scoring,
                                              (args.thresholds, args.best_by))
    at = min(curve, key=lambda row: abs(row["threshold"] - threshold))
    advice = f"; use it with --threshold {best['threshold']:g}" \
        if abs(best["threshold"] - threshold) > 1e-9 else " (the threshold in use)"
    print(f"best threshold on {split}: {best['threshold']:g} (mean {args.best_by} "
          f"{best[args.best_by]:.4f}; {at[args.best_by]:.4f} at {at['threshold']:g}){advice}")
    print(f"saved {out / 'threshold_analysis.png'}, {out / 'threshold_curve.csv'}, "
          f"{out / 'probability_histogram.csv'}")
    scored = evaluate.variant_scores(predictor, pairs, threshold, scoring,
                                     only=["iou", "threshold_jaccard"])
    evaluate.print_variants(scored, f"{split} split at threshold {threshold:g}, per-image means:")


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
