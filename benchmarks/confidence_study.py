"""Which per-image confidence finds the failed masks: the candidate formulas side by side.

    python benchmarks/confidence_study.py runs/fpn --last      # the fold models, each on its fold

test_model.py reports one confidence (metrics.CONFIDENCE) from the map the prediction made.
This study runs each fold model on its own validation fold under the 4 flip views (the image
and its three flips; 4 forward passes per image, which is why it is not part of
--evaluate), scores the plain prediction at the original size, and prints for each candidate
its AUROC for telling failed images (IoU < 0.65) from the rest, with its 95% bootstrap
interval, and its paired difference from the plain soft IoU (the same resampled images for
both). With --out it also writes every image's candidates to a CSV.
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import device as device_lib  # noqa: E402
from checkpoint import input_settings  # noqa: E402
import evaluate  # noqa: E402
import load_dataset  # noqa: E402
import metrics  # noqa: E402
import predict  # noqa: E402
import preprocess  # noqa: E402


def soft_agreement(maps):
    """How much maps agree: sum of the pixelwise minimum over sum of the maximum (a soft IoU
    of all the maps at once). 1 when they are identical."""
    maps = np.asarray(maps, np.float32)
    union = float(maps.max(0).sum())
    return float(maps.min(0).sum()) / union if union else 1.0


def mask_agreement(maps, threshold=0.5):
    """IoU of the pixels every map calls lesion with the pixels any map calls lesion."""
    masks = np.asarray(maps, np.float32) >= np.float32(threshold)
    union = int(masks.any(0).sum())
    return int(masks.all(0).sum()) / union if union else 1.0


def candidates(views, threshold=0.5):
    """{name: confidence} of one image from its 4 flip views (V, h, w), the identity first."""
    views = np.asarray(views, np.float32)
    plain, mean, agree = views[0], views.mean(0), soft_agreement(views)
    base, largest = metrics.soft_iou(plain, threshold), metrics.soft_iou_largest(plain, threshold)
    return {"soft_iou": base, "soft_iou_largest": largest,
            "soft_iou_flips": metrics.soft_iou(mean, threshold),
            "soft_iou_largest_flips": metrics.soft_iou_largest(mean, threshold),
            "view_agreement": agree, "mask_agreement": mask_agreement(views, threshold),
            "soft_iou_x_agreement": base * agree, "soft_iou_largest_x_agreement": largest * agree}


def flip_views(model, images, compute):
    """(N, 4, h, w) maps of a batch under the 4 flip views, each mapped back to place."""
    views = []
    for forward, inverse in predict.tta_views("flips", True):
        probs = predict.probabilities(model, forward(images), compute.device, compute.mixed,
                                      compute.channels_last)
        views.append(inverse(probs[:, None])[:, 0].cpu().numpy())
    return np.stack(views, 1)


def fold_rows(path, compute, args):
    """Per image of the fold model's own fold: its IoU (plain prediction) and candidates."""
    model, ckpt = predict.load_model(path, compute)
    pairs = evaluate.load_split(ckpt, args.data, "valid")
    settings = input_settings(ckpt)
    loader = load_dataset.make_loader(pairs, settings, args.batch_size,
                                      load_dataset.LoaderOptions(workers=args.workers),
                                      truth=True)
    threshold, rows = float(ckpt["settings"]["threshold"]), []
    for batch in loader:
        if batch is None:
            continue
        images, _, ids, truths = batch
        for views, pair_id, (bits, hw) in zip(flip_views(model, images, compute), ids, truths):
            truth = preprocess.unpack_truth(bits, hw)
            _, scores = metrics.score_at_original(views[0], truth, threshold, only=["iou"])
            rows.append({"fold": ckpt["settings"]["fold"], "id": pair_id, "iou": scores["iou"],
                         **candidates(views, threshold)})
    return rows


def print_study(rows):
    iou = [r["iou"] for r in rows]
    names = list(candidates(np.zeros((4, 2, 2))))
    print(f"{len(rows)} images, {int(metrics.failed(iou).sum())} failed (IoU < "
          f"{metrics.JACCARD_THRESHOLD:g})\n")
    print("| candidate | AUROC [95% interval] | minus soft_iou, paired [95% interval] |")
    print("| --- | --- | --- |")
    base = [r["soft_iou"] for r in rows]
    for name in sorted(names, key=lambda n: -metrics.failure_auroc([r[n] for r in rows], iou)):
        conf = [r[name] for r in rows]
        a = metrics.failure_auroc_interval(conf, iou)
        d = metrics.paired_auroc(conf, base, iou) if name != "soft_iou" else None
        diff = f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" if d else ""
        mark = " (reported as confidence)" if name == metrics.CONFIDENCE else ""
        print(f"| `{name}`{mark} | {a['auroc']:.3f} [{a['low']:.3f}, {a['high']:.3f}] | {diff} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model_dir", help="folder of fold models (train_model.py --folds K --fold I)")
    p.add_argument("--last", action="store_true", help="each fold's last epoch, not its best")
    p.add_argument("--data", default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="CSV of every image's candidates")
    args = p.parse_args(argv)
    # the precision test_model.py predicts in by default (MIXED_PRECISION, CHANNELS_LAST)
    compute = device_lib.prepare("auto", True, True)
    rows = []
    for path in evaluate.fold_models(args.model_dir, None, args.last):
        rows += fold_rows(path, compute, args)
    if args.out:
        preprocess.write_csv(args.out, rows, list(rows[0]))
    print_study(rows)


if __name__ == "__main__":
    main()
