"""Generated dermoscopy-like demo pairs: skin, an irregular pigmented lesion, hairs, rulers
and dark dermoscope corners, in the ISIC 2018 Task 1 layout. Not real lesions: the demo and the
tests run on them because the ISIC data cannot ship with the project.

    python demo_data.py                 # write DEMO_COUNT pairs to data/demo
    python demo_data.py --count 40 --out /tmp/demo
"""
import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np

import preprocess

DEMO_DIR = "data/demo"  # where the demo set is written by default
DEMO_COUNT = 240  # generated pairs in the demo set
DEMO_SEED = 0  # seed of the generator
DEMO_MARKER = "demo.json"  # written at the top of a demo tree; marks it as generated

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

    The marker goes first, so that a generation cut short still marks the folder as generated
    (a scan of data/ never takes it for real pairs), and is marked complete last; every file
    is written whole or not at all. The same seed gives the same bytes. Ids start at
    ISIC_9000000, outside the real range."""
    root = Path(root)
    images = root / "ISIC2018_Task1-2_Training_Input"
    masks = root / "ISIC2018_Task1_Training_GroundTruth"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    record = {"generated_by": "demo_data.make_demo", "count": count, "seed": seed}
    preprocess.write_text(root / DEMO_MARKER, json.dumps({**record, "complete": False}))
    for i in range(count):
        image, mask = demo_pair(np.random.default_rng([seed, i]))
        pair_id = f"ISIC_{9000000 + i:07d}"
        for path, array, params in ((images / f"{pair_id}.jpg", image[..., ::-1],
                                     [cv2.IMWRITE_JPEG_QUALITY, 90]),
                                    (masks / f"{pair_id}_segmentation.png", mask, [])):
            ok, encoded = cv2.imencode(path.suffix, array, params)
            if not ok:  # cv2 reports failure, never raises
                raise OSError(f"cannot encode {path}")
            preprocess.write_bytes(path, encoded.tobytes())
    preprocess.write_text(root / DEMO_MARKER, json.dumps({**record, "complete": True}))
    return root


def is_complete(root):
    """True when root holds a demo set whose generation finished."""
    try:
        return json.loads((Path(root) / DEMO_MARKER).read_text()).get("complete", True)
    except (OSError, ValueError, AttributeError):
        return False


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=DEMO_DIR, help="folder to write (default: %(default)s)")
    parser.add_argument("--count", type=int, default=DEMO_COUNT, help="pairs to generate")
    parser.add_argument("--seed", type=int, default=DEMO_SEED)
    args = parser.parse_args(argv)
    try:
        make_demo(args.out, args.count, args.seed)
    except OSError as err:
        print(f"cannot write demo data to {args.out}: {err.strerror or err}", file=sys.stderr)
        return 2
    print(f"wrote {args.count} demo pairs to {args.out} (ISIC 2018 Task 1 layout)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
