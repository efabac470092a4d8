"""The textbook segmentation-models-pytorch loop: the accuracy baseline the recipe must beat.

The project's training recipe (cache, sizing, schedule, augmentation, ...) has to earn its
complexity: with the same images, the same wall-clock budget and the same scorer it should
give better masks than the plain loop any smp tutorial teaches. This script is that plain
loop. It is deliberately untuned (FPN + resnet18 from scratch, Dice loss, Adam 1e-4, batch 8,
flips and brightness/contrast, every image decoded and resized every epoch, no validation,
no schedule); please do not improve it, or the comparison loses its meaning.

    python benchmarks/plain_loop.py --minutes 30 --fold 0     # train on folds != 0, score fold 0
    python benchmarks/plain_loop.py --minutes 30 --test       # train on all folds, score test part
    python benchmarks/plain_loop.py --minutes 0.3 --per-image fold0.csv   # quick smoke run

The pairs, the held-out test part and the K folds come from load_dataset (split_pairs and
fold_splits), as train_model.py --fold draws them, so the two are scored on the same images.
Scores are per image at the mask's own size with metrics.py (mean IoU, Dice, thresholded Jaccard).
The last line printed is one JSON object with the figures, so runs can be tracked.
"""
import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import segmentation_models_pytorch as smp  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset, get_worker_info  # noqa: E402

import load_dataset  # noqa: E402
import metrics  # noqa: E402
import preprocess  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "isic2018_task1_sample"


# ====================================================================== THE TEXTBOOK RECIPE
# What a segmentation-models-pytorch tutorial would write. Untuned on purpose: keep it so.
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the tutorial's own: ImageNet's statistics
IMAGENET_STD = (0.229, 0.224, 0.225)


def read_image(path, size_hw):
    image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    return cv2.resize(image, size_hw[::-1], interpolation=cv2.INTER_LINEAR)


class LesionDataset(Dataset):
    def __init__(self, pairs, size_hw, seed):
        self.pairs, self.size_hw = pairs, size_hw
        self.augment = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5),
                                  A.RandomBrightnessContrast(p=0.2),
                                  A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)], seed=seed)

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        image = read_image(self.pairs[i].image, self.size_hw)
        mask = (cv2.imread(str(self.pairs[i].mask), cv2.IMREAD_GRAYSCALE) > 127).astype(np.uint8)
        mask = cv2.resize(mask, self.size_hw[::-1], interpolation=cv2.INTER_NEAREST)
        out = self.augment(image=image, mask=mask)
        return (torch.from_numpy(out["image"].transpose(2, 0, 1).copy()),
                torch.from_numpy(out["mask"][None].astype(np.float32)))


def seed_worker(_):  # each worker, each epoch: its own augmentation, following torch's seed
    get_worker_info().dataset.augment.set_random_seed(torch.initial_seed() % 2**32)


def train(pairs, size_hw, minutes, max_epochs, seed):
    model = smp.FPN(encoder_name="resnet18", encoder_weights=None, classes=1)
    loss_fn = smp.losses.DiceLoss("binary", from_logits=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loader = DataLoader(LesionDataset(pairs, size_hw, seed), batch_size=8, shuffle=True,
                        num_workers=max(1, (os.cpu_count() or 1) - 1), worker_init_fn=seed_worker)
    model.train()
    start, epochs, steps, seen, out_of_time = time.perf_counter(), 0, 0, 0, False
    while epochs < max_epochs and not out_of_time:
        for images, masks in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(images), masks)
            loss.backward()
            optimizer.step()
            steps, seen = steps + 1, seen + len(images)
            out_of_time = time.perf_counter() - start >= minutes * 60
            if out_of_time:
                break
        else:
            epochs += 1
    return model, {"seconds": time.perf_counter() - start, "steps": steps, "images": seen,
                   "epochs": seen / len(pairs), "last_loss": loss.item() if steps else None}
# ================================================================ END OF THE TEXTBOOK RECIPE


def score(model, pairs, size_hw):
    """Per-image (id, confusion counts): network size in, probability back at the mask's size."""
    model.eval()
    rows = []
    with torch.inference_mode():
        for pair in pairs:
            image = read_image(pair.image, size_hw).astype(np.float32) / 255
            image = (image - IMAGENET_MEAN) / IMAGENET_STD
            x = torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32))[None]
            prob = torch.sigmoid(model(x))[0, 0].numpy()
            truth = cv2.imread(str(pair.mask), cv2.IMREAD_GRAYSCALE) > 127
            h, w = truth.shape
            prob = cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR)
            rows.append((pair.id, metrics.confusion(prob >= 0.5, truth)))
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ISIC image/mask folder")
    p.add_argument("--folds", type=int, default=5, help="K, the number of folds")
    p.add_argument("--fold", type=int, default=0, help="the fold scored (trained on the others)")
    p.add_argument("--test", action="store_true",
                   help="train on every fold and score the held-out test part instead")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--minutes", type=float, default=math.inf, help="training wall-clock budget")
    p.add_argument("--epochs", type=int, default=1000, help="at most this many epochs")
    p.add_argument("--image-size", type=int, nargs=2, default=(192, 192), metavar=("H", "W"))
    p.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    p.add_argument("--per-image", type=Path, metavar="CSV", help="write id, iou, "
                   "threshold_jaccard per scored image (and the summary beside it, .json)")
    args = p.parse_args(argv)
    if args.folds < 2 or not 0 <= args.fold < args.folds:
        p.error(f"need --folds >= 2 and 0 <= --fold < --folds (got {args.fold}, {args.folds})")
    if args.minutes <= 0 or args.epochs < 1:
        p.error("--minutes must be > 0 and --epochs >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    size_hw = tuple(args.image_size)

    found = load_dataset.scan(args.data)
    if not found.pair_count():
        sys.exit(f"no image/mask pairs in {args.data} ({found.layout})")
    # the project's own split and folds, so that both are scored on the same images
    splits = load_dataset.split_pairs(found, seed=args.seed)
    fold = load_dataset.fold_splits(found, splits, args.folds, args.fold, args.seed)
    by_id = {p.id: p for s in fold.values() for p in s}
    if args.test:
        train_ids, scored_ids = [p.id for p in fold["train"] + fold["valid"]], \
            [p.id for p in fold["test"]]
    else:
        train_ids, scored_ids = [p.id for p in fold["train"]], [p.id for p in fold["valid"]]
    train_pairs = [by_id[i] for i in sorted(train_ids)]
    scored_pairs = [by_id[i] for i in scored_ids]
    what = "test part" if args.test else f"fold {args.fold} of {args.folds}"
    print(f"{len(by_id)} pairs in {args.data}: training on {len(train_pairs)}, "
          f"scoring {len(scored_pairs)} ({what}); image size {size_hw[0]}x{size_hw[1]}")

    model, run = train(train_pairs, size_hw, args.minutes, args.epochs, args.seed)
    images_per_s = run["images"] / run["seconds"]
    print(f"trained {run['epochs']:.2f} epochs, {run['steps']} steps, {run['images']} images "
          f"in {run['seconds'] / 60:.2f} wall minutes: {images_per_s:.1f} images/s "
          f"(last Dice loss {run['last_loss']})")

    rows = score(model, scored_pairs, size_hw)
    means = metrics.mean_scores(counts for _, counts in rows)
    print(f"{what}: IoU {means['iou']:.4f}, Dice {means['dice']:.4f}, thresholded Jaccard "
          f"{means['threshold_jaccard']:.4f} over {means['images']} images")
    if args.per_image:
        args.per_image.parent.mkdir(parents=True, exist_ok=True)
        table = []
        for pair_id, counts in rows:
            s = metrics.scores(*counts)
            table.append({"id": pair_id, "iou": f"{s['iou']:.6f}",
                          "threshold_jaccard": f"{s['threshold_jaccard']:.6f}"})
        preprocess.write_csv(args.per_image, table, ["id", "iou", "threshold_jaccard"])
        print(f"per-image scores: {args.per_image}")
    result = json.dumps({
        "fold": "test" if args.test else args.fold, "folds": args.folds,
        "minutes": round(run["seconds"] / 60, 3), "epochs": round(run["epochs"], 3),
        "images_per_s": round(images_per_s, 2), "iou": round(means["iou"], 4),
        "dice": round(means["dice"], 4), "threshold_jaccard": round(means["threshold_jaccard"], 4),
        "images": means["images"]})
    if args.per_image:  # beside the per-image scores, for benchmarks/compare_recipes.py
        preprocess.write_text(args.per_image.with_suffix(".json"), result + "\n")
    print(result)


if __name__ == "__main__":
    main()
