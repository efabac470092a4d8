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
