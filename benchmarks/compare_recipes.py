"""The 5-fold table of docs/results.md: training recipes against a baseline, fold by fold.

    python benchmarks/compare_recipes.py --plain runs/plain runs/fpn runs/unet --last
    python benchmarks/compare_recipes.py --reference runs/fpn runs/unet runs/deeplabv3plus --last
    python benchmarks/compare_recipes.py --reference runs/ref runs/b4db --last --more-draws _s7

The runs behind the tables (D: the data; one run at a time, one thread each):

    export OMP_NUM_THREADS=1
    for i in 0 1 2 3 4; do
      python train_model.py --data D --model-dir runs/fpn --folds 5 --fold $i \
          --encoder resnet18 --encoder-weights none --image-size 128 128 --epochs 13 \
          --lr 3e-4 --lr-drop-epoch 10 --lr-after-drop 3e-5 --workers 1 --quiet
      python train_model.py --data D --model-dir runs/unet --arch Unet --folds 5 --fold $i \
          --encoder resnet18 --encoder-weights none --image-size 128 128 --epochs 11 \
          --lr 3e-4 --lr-drop-epoch 8 --lr-after-drop 3e-5 --workers 1 --quiet
      python benchmarks/plain_loop.py --data D --fold $i --minutes 3.37 \
          --per-image runs/plain/plain_$i.csv
    done
    python test_model.py --cross-validation runs/fpn --last   # and runs/unet

The training levers (docs/results.md, "Training levers at equal time"): the FPN recipe's
command above, into runs/NAME, with these flags added (a later flag wins), then scored the
same way and compared with --reference runs/fpn:

    combo   --schedule cosine --warmup-epochs 1 --lr 1e-3 --ema-decay 0.98 --loss dice+bce \
            --optimizer adamw --weight-decay 1e-2
    cosine  --schedule cosine --warmup-epochs 1 --lr 1e-3
    ema     --ema-decay 0.98
    dicebce --loss dice+bce
    noema   --schedule cosine --warmup-epochs 1 --lr 1e-3 --loss dice+bce --optimizer adamw \
            --weight-decay 1e-2
    adamw   --optimizer adamw --weight-decay 1e-2
    lovasz  --loss lovasz
    sgd     --optimizer sgd --lr 1e-2 --schedule poly --weight-decay 3e-5
    ds      --deep-supervision
    prog96  --epochs 17 --lr-drop-epoch 14 --early-epochs 9 --early-image-size 96 96
    batch4  --batch-size 4 --epochs 11 --lr-drop-epoch 8
    dbprog  --loss dice+bce --epochs 17 --lr-drop-epoch 14 --early-epochs 9 \
            --early-image-size 96 96
    final   --schedule cosine --warmup-epochs 1 --lr 1e-3 --ema-decay 0.98 --loss dice+bce \
            --optimizer adamw --weight-decay 1e-2 --epochs 17 --early-epochs 9 \
            --early-image-size 96 96
    regnety --encoder tu-regnety_004 --epochs 17 --lr-drop-epoch 14
    b4lov   --loss lovasz --batch-size 4 --epochs 11 --lr-drop-epoch 8
    b4db    --loss dice+bce --batch-size 4 --epochs 11 --lr-drop-epoch 8
    b4dbprog --loss dice+bce --batch-size 4 --epochs 14 --lr-drop-epoch 11 --early-epochs 7 \
            --early-image-size 96 96
    b4dbhi  --loss dice+bce --batch-size 4 --epochs 11 --lr-drop-epoch 8 --lr 6e-4 \
            --lr-after-drop 6e-5
    b2db    --loss dice+bce --batch-size 2 --epochs 9 --lr-drop-epoch 7
    b4dbl   --loss dice+bce+lovasz --batch-size 4 --epochs 11 --lr-drop-epoch 8
    b4dbfl  --loss dice+bce --batch-size 4 --epochs 11 --lr-drop-epoch 8 --augment flips

    python benchmarks/compare_recipes.py --reference runs/fpn runs/combo runs/cosine runs/ema \
        runs/dicebce runs/noema runs/adamw runs/lovasz runs/sgd runs/ds runs/prog96 \
        runs/batch4 runs/dbprog runs/final runs/regnety runs/b4lov runs/b4db \
        runs/b4dbprog --last

Then the last four and b4db, with the reference (the FPN recipe above, in runs/ref), once more
with `--seed 7` into NAME_s7 (b4dbl, b4db and the reference also with `--seed 11` into
NAME_s11); then sgd (above) on both draws and resnet34 on the first:

    r34     --encoder resnet34 --epochs 9 --lr-drop-epoch 7

    python benchmarks/compare_recipes.py --reference runs/ref runs/b4db runs/b4dbhi runs/b2db \
        runs/b4dbl runs/b4dbfl --last --more-draws _s7
    python benchmarks/compare_recipes.py --reference runs/ref runs/b4db runs/b4dbl --last \
        --more-draws _s7 _s11
    python benchmarks/compare_recipes.py --reference runs/ref_s11 runs/b4dbl_s11 runs/b4db_s11 \
        --last
    python benchmarks/compare_recipes.py --reference runs/ref runs/sgd runs/r34 --last
    python benchmarks/compare_recipes.py --reference runs/ref_s7 runs/sgd_s7 --last

(prog96, dbprog and final: 9 epochs at 96x96 cost about 5 at 128x128, so 17 epochs take the
time of 13; batch4, b4lov and b4db: a step of 4 images trained 0.87 times as many images a
second as one of 8 in benchmarks/encoder_speed.py, so 11 epochs, and b4dbprog's 7 at 96x96
cost about 4 of those; regnety: timm's regnety_004 trained 1.33 times as many images a
second as resnet18 there, so 17 epochs; b2db: a step of 2 trained 0.81 times as many as one
of 4, so 9 epochs; b4dbl: the Lovasz hinge adds about 10 ms to a step of about 370 ms, so
b4db's 11 epochs.)

The baseline is one of two:

- --plain: a folder of `benchmarks/plain_loop.py --fold I --per-image DIR/plain_I.csv` runs
  (each also leaves plain_I.json);
- --reference: a folder of fold models, read and scored like the other folders (its plain
  variant, no test-time views nor post-processing, is the baseline).

Every other folder holds the fold models of one recipe (`train_model.py --folds K --fold I
--model-dir DIR`, files named as checkpoint.run_stem names them) already scored by
`test_model.py --cross-validation DIR` (with --last: `--cross-validation DIR --last`).

Per row: the out-of-fold mean over all scored images (per image, as the ISIC scorer
averages), the standard deviation of the fold means, and the paired difference from the
baseline on the same folds (mean and standard deviation over folds; population standard
deviations, as test_model.py --cross-validation reports them) with, in square brackets, the
95% paired bootstrap interval of the per-image difference (the same images resampled for
both, metrics.paired_bootstrap); then the training minutes per fold (validation included for
the recipes) and training images per second. A recipe's test-time and post-processing
variants are also paired against its plain variant.

With --more-draws SUFFIX [SUFFIX ...], every folder F (the reference's too) was also trained
with other --seed values (other folds, other starts) into F+SUFFIX, and scored the same way; a
second table then gives each variant's scores averaged per image over the draws, paired per
image with the reference's plain variant averaged the same way (a recipe picked on one draw is
judged on all), and the thresholded Jaccard gain in each draw alone.

Everything is read from files the runs write: per-image CSVs, the cross-validation
summary.json (training pairs per fold, beside each fold checkpoint's "settings") and each
fold's epoch log (seconds per epoch; checkpoint.RUN_FILES["log"], its fold read from its name
with checkpoint.fold_of).
"""
import argparse
import csv
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import checkpoint  # noqa: E402
import metrics  # noqa: E402

KEYS = ("iou", "threshold_jaccard")
PLAIN_VARIANT = ("none", "False")


def fold_means(rows):
    """{fold: {key: mean over that fold's images}}"""
    by_fold = {}
    for r in rows:
        by_fold.setdefault(int(r["fold"]), []).append(r)
    return {f: {k: statistics.mean(float(r[k]) for r in rs) for k in KEYS}
            for f, rs in sorted(by_fold.items())}


def pooled(rows):
    return {k: statistics.mean(float(r[k]) for r in rows) for k in KEYS}


def paired(mine, theirs):
    """(mean, population std) over the folds of mine - theirs, per key."""
    if set(mine) != set(theirs):
        sys.exit(f"the runs cover different folds ({sorted(mine)} against {sorted(theirs)}): "
                 f"finish or remove the missing ones first")
    folds = sorted(mine)
    out = {}
    for k in KEYS:
        d = [mine[f][k] - theirs[f][k] for f in folds]
        out[k] = (statistics.mean(d), statistics.pstdev(d)) if d else (float("nan"),) * 2
    return out


def read_plain(folder):
    rows, runs = [], []
    for path in sorted(folder.glob("plain_*.csv")):
        fold = path.stem.split("_")[1]
        if not fold.isdigit():
            continue  # plain_test.csv: the test part, not a fold
        with open(path) as f:
            rows += [{**r, "fold": fold} for r in csv.DictReader(f)]
        if path.with_suffix(".json").is_file():
            runs.append(json.loads(path.with_suffix(".json").read_text()))
    if not rows:
        sys.exit(f"no plain_<I>.csv in {folder}: run benchmarks/plain_loop.py --fold I "
                 f"--per-image {folder}/plain_I.csv")
    minutes = statistics.mean(r["minutes"] for r in runs) if runs else None
    speed = statistics.mean(r["images_per_s"] for r in runs) if runs else None
    return rows, minutes, speed


def train_pairs(summary, rows):
    """{fold: training pairs} from the cross-validation summary.json; for one written before
    it recorded them, every scored image outside the fold (the folds partition the pool)."""
    recorded = {int(f): c["train_pairs"] for f, c in summary.get("checkpoints", {}).items()
                if c.get("train_pairs") is not None}
    plain = [r for r in rows if (r["tta"], r["postprocess"]) == PLAIN_VARIANT]
    folds = [int(r["fold"]) for r in plain]
    return recorded or {f: len(folds) - folds.count(f) for f in set(folds)}


def read_recipe(folder, last):
    scored = folder / ("cross_validation_last" if last else "cross_validation")
    table = scored / "per_image.csv"
    if not table.is_file():
        sys.exit(f"no {table}: run python test_model.py --cross-validation {folder}"
                 f"{' --last' if last else ''}")
    with open(table) as f:
        rows = list(csv.DictReader(f))
    summary = json.loads((scored / "summary.json").read_text()) \
        if (scored / "summary.json").is_file() else {}
    pairs = train_pairs(summary, rows)
    seconds, images = [], []
    for log in sorted(folder.glob(f"*{checkpoint.RUN_FILES['log']}")):
        fold = checkpoint.fold_of(log)
        if fold is None:
            continue
        with open(log) as f:
            epochs = list(csv.DictReader(f))
        seconds.append(sum(float(e["seconds"]) for e in epochs))
        if fold in pairs and seconds[-1] > 0:
            images.append(pairs[fold] * len(epochs) / seconds[-1])
    minutes = statistics.mean(seconds) / 60 if seconds else None
    return rows, minutes, statistics.mean(images) if images else None


def per_image_difference(rows, reference):
    """metrics.paired_bootstrap of rows - reference on the images both scored, by id."""
    theirs = {r["id"]: r for r in reference}
    common = [r for r in rows if r["id"] in theirs]
    return {k: metrics.paired_bootstrap([float(r[k]) for r in common],
                                        [float(theirs[r["id"]][k]) for r in common])
            for k in KEYS}


def cell(rows, reference):
    means = fold_means(rows)
    spread = {k: statistics.pstdev(m[k] for m in means.values()) for k in KEYS}
    diff = paired(means, fold_means(reference)) if reference is not None else None
    boot = per_image_difference(rows, reference) if reference is not None else None
    out = []
    for k in KEYS:
        text = f"{pooled(rows)[k]:.3f} ± {spread[k]:.3f}"
        if diff:
            text += (f" ({diff[k][0]:+.3f} ± {diff[k][1]:.3f}; "
                     f"[{boot[k]['low']:+.3f}, {boot[k]['high']:+.3f}])")
        out.append(text)
    return out


def number(x, digits):
    return "" if x is None else f"{x:.{digits}f}"


def variants_of(rows):
    """{(tta, postprocess): rows}, the plain variant first, then post-processing, flips, both."""
    variants = {}
    for r in rows:
        variants.setdefault((r["tta"], r["postprocess"]), []).append(r)
    return dict(sorted(variants.items(), key=lambda v: (v[0][0] != "none", v[0])))


def gain_line(name, mine, base):
    """A variant over its folder's plain variant: paired over folds and over images."""
    d = paired(fold_means(mine), fold_means(base))
    b = per_image_difference(mine, base)
    return (f"{name}: over no TTA/post-processing, IoU {d['iou'][0]:+.3f} ± "
            f"{d['iou'][1]:.3f}, thresholded Jaccard {d['threshold_jaccard'][0]:+.3f} ± "
            f"{d['threshold_jaccard'][1]:.3f} (paired over folds); 95% paired bootstrap over "
            f"images: IoU [{b['iou']['low']:+.3f}, {b['iou']['high']:+.3f}], thresholded "
            f"Jaccard [{b['threshold_jaccard']['low']:+.3f}, "
            f"{b['threshold_jaccard']['high']:+.3f}]")


def recipe_rows(folder, run, baseline, gains):
    """The table rows of one folder of fold models, each variant paired with `baseline`
    (None: the folder is the baseline, its plain variant unpaired); its variants' gains over
    its plain variant are added to `gains`."""
    rows, minutes, speed = run
    variants = variants_of(rows)
    base = variants.get(PLAIN_VARIANT)
    lines = []
    for variant, mine in variants.items():
        plain = variant == PLAIN_VARIANT
        name = folder.name if plain else \
            f"{folder.name}, tta {variant[0]}, post-processing {variant[1]}"
        timing = f"{number(minutes, 2)} | {number(speed, 1)}" if plain else " | "
        reference = baseline if baseline is not None or plain else base
        lines.append(f"| {name} | {' | '.join(cell(mine, reference))} | {timing} |")
        if not plain and base:
            gains.append(gain_line(name, mine, base))
    return lines


def averaged_draws(draws, folder):
    """Per image and variant, the mean of several draws' scores: the same images, scored in
    other folds by models from other starts."""
    first, others = draws[0], draws[1:]
    keyed = [{(r["id"], r["tta"], r["postprocess"]): r for r in rows} for rows in others]
    if any(len(k) != len(first) or any((r["id"], r["tta"], r["postprocess"]) not in k
                                       for r in first) for k in keyed):
        sys.exit(f"{folder}: its draws did not score the same images and variants")
    return [{**r, **{k: statistics.mean([float(r[k])] + [float(
        other[r["id"], r["tta"], r["postprocess"]][k]) for other in keyed]) for k in KEYS}}
        for r in first]


def draw_rows(folder, draws, reference, is_reference=False):
    """Rows of the table of --more-draws: each variant of a folder, averaged over its draws,
    paired per image with the reference's plain variant averaged the same way (the
    reference's own plain variant unpaired); then the thresholded Jaccard gain in each draw
    alone."""
    every = variants_of(averaged_draws(draws, folder))
    singles = [variants_of(rows) for rows in draws]
    lines = []
    for variant, mine in every.items():
        plain = variant == PLAIN_VARIANT
        name = folder.name if plain else \
            f"{folder.name}, tta {variant[0]}, post-processing {variant[1]}"
        cells = [f"{pooled(mine)[k]:.3f}" for k in KEYS]
        if not (is_reference and plain):
            boot = per_image_difference(mine, reference["every"])
            cells = [f"{c} ({boot[k]['mean']:+.3f}; [{boot[k]['low']:+.3f}, "
                     f"{boot[k]['high']:+.3f}])" for c, k in zip(cells, KEYS)]
        each = " / ".join(f"{gain:+.3f}" for gain in (
            pooled(one[variant])["threshold_jaccard"] - pooled(ref)["threshold_jaccard"]
            for one, ref in zip(singles, reference["each"])))
        lines.append(f"| {name} | {' | '.join(cells)} | {each} |")
    return lines


def print_more_draws(args):
    """The table of --more-draws."""
    def draws(folder):
        return [read_recipe(folder.with_name(folder.name + suffix), args.last)[0]
                for suffix in ["", *args.more_draws]]

    ref_draws = draws(args.reference)
    reference = {"every": variants_of(averaged_draws(ref_draws, args.reference))[PLAIN_VARIANT],
                 "each": [variants_of(rows)[PLAIN_VARIANT] for rows in ref_draws]}
    n = len(ref_draws)
    names = ", ".join(f"F{suffix}" for suffix in args.more_draws)
    print(f"\n{n} draws (each folder F and {names}), averaged per image; each paired with the "
          f"reference's plain variant averaged the same way:\n")
    print(f"| recipe | out-of-fold IoU, {n} draws (vs reference; 95% paired bootstrap) | "
          f"out-of-fold thresholded Jaccard, {n} draws (vs reference; 95% paired bootstrap) | "
          f"thresholded Jaccard vs reference, each draw |")
    print("| --- | --- | --- | --- |")
    print("\n".join(draw_rows(args.reference, ref_draws, reference, is_reference=True)))
    for folder in args.recipes:
        print("\n".join(draw_rows(folder, draws(folder), reference)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    baseline = p.add_mutually_exclusive_group(required=True)
    baseline.add_argument("--plain", type=Path, help="folder of plain-loop fold runs")
    baseline.add_argument("--reference", type=Path, metavar="FOLDER",
                          help="folder of fold models (scored by test_model.py "
                               "--cross-validation) that every other folder is paired with")
    p.add_argument("recipes", type=Path, nargs="+", help="folders of fold models")
    p.add_argument("--last", action="store_true", help="the recipes' last-epoch scores")
    p.add_argument("--more-draws", nargs="+", metavar="SUFFIX", default=[],
                   help="each folder F (the reference's too) was also trained with other "
                        "--seed values into F+SUFFIX: add a table of the draws averaged per "
                        "image")
    args = p.parse_args(argv)
    if args.more_draws and args.reference is None:
        p.error("--more-draws needs --reference")
    return args


def main(argv=None):
    args = parse_args(argv)
    gains = []
    if args.plain is not None:
        baseline, minutes, speed = read_plain(args.plain)
        what, first = "plain", [f"| plain loop ({args.plain}) | "
                                f"{' | '.join(cell(baseline, None))} | {number(minutes, 2)} | "
                                f"{number(speed, 1)} |"]
    else:
        run = read_recipe(args.reference, args.last)
        baseline = variants_of(run[0]).get(PLAIN_VARIANT)
        if not baseline:
            sys.exit(f"no plain variant (tta none, no post-processing) scored in "
                     f"{args.reference}")
        what, first = "reference", recipe_rows(args.reference, run, None, gains)
    print(f"| recipe | out-of-fold IoU (vs {what}; 95% paired bootstrap) | out-of-fold "
          f"thresholded Jaccard (vs {what}; 95% paired bootstrap) | minutes per fold | "
          f"images/s |")
    print("| --- | --- | --- | --- | --- |")
    print("\n".join(first))
    for folder in args.recipes:
        print("\n".join(recipe_rows(folder, read_recipe(folder, args.last), baseline, gains)))
    print("\n".join([""] + gains))
    if args.more_draws:
        print_more_draws(args)


if __name__ == "__main__":
    main()
