"""Render a report.html in headless Chromium, as a person sees it, and save a screenshot.

    python benchmarks/screenshot_report.py                      # the demo's test report
    python benchmarks/screenshot_report.py PATH/report.html --out docs/x.png

Not part of the test suite: it needs Debian's `chromium` package (`apt-get install -y
chromium`). Chromium runs with no network features and a fresh profile folder, so the
screenshot shows what an offline browser shows.
"""
import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# of `python test_model.py --evaluate` on the demo's model, Model/demo/demo_fpn_resnet18.pth
# (its results folder is named by checkpoint.results_name: the run's name)
REPORT = REPO / "Model" / "demo" / "evaluation" / "demo_fpn_resnet18" / "test" / "report.html"
OUT = REPO / "docs" / "demo_report.png"  # for docs/evaluation.md, section report.html
WINDOW = (1280, 1600)  # width, height of the page captured, px
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--hide-scrollbars")


def browser():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return name
    sys.exit("no chromium on PATH: apt-get install -y chromium")


def screenshot(report, out, window=WINDOW):
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        cmd = [browser(), *FLAGS, f"--user-data-dir={profile}",
               f"--window-size={window[0]},{window[1]}", f"--screenshot={out.resolve()}",
               report.resolve().as_uri()]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or not out.is_file():
        sys.exit(f"chromium failed ({done.returncode}): {done.stderr[-800:]}")
    shrink(out)
    return out


def shrink(path, colours=256):
    """An adaptive 256-colour palette: a third of the bytes in the repository, the same to the
    eye for a page of text, charts and small thumbnails."""
    from PIL import Image

    with Image.open(path) as img:
        small = img.convert("RGB").quantize(colours, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("report", nargs="?", type=Path, default=REPORT)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if not args.report.is_file():
        sys.exit(f"no {args.report}: run python train_model.py --demo, then "
                 f"python test_model.py --evaluate --model-dir Model/demo")
    print(f"saved {screenshot(args.report, args.out)}")


if __name__ == "__main__":
    main()
