"""Make the top-level scripts importable from the tests, wherever pytest is started, and keep
torch to one thread: on 2 shared cores, two threads per process wait on each other."""
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the scripts tests start

import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# the settings record of a checkpoint made in a test: a demo-sized FPN unless a test says more
RUN = {"arch": "FPN", "encoder": "resnet18", "encoder_depth": 5, "image_size": [64, 64],
       "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "threshold": 0.5,
       "interpolation": "area", "seed": 42, "folds": 1, "fold": None, "data": ".",
       "demo": False}


def record_of(model, settings, epoch=1, valid_iou=0.5):
    """A best-model checkpoint as train_model.py writes it, of `model` and the settings a test
    gives (split_file beside them; every other setting from RUN)."""
    import checkpoint

    run = {**RUN, **{k: v for k, v in settings.items() if k != "split_file"}}
    run["image_size"] = list(run["image_size"])
    return checkpoint.make_checkpoint(model, {"settings": run,
                                              "split_file": settings.get("split_file")},
                                      epoch, valid_iou)
