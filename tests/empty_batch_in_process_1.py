"""train_model.py under torchrun where the second training batch of process 1 comes back
empty (every file in it became unreadable) while process 0's is fine. Used by
tests/test_distributed.py."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import load_dataset  # noqa: E402
import train_model  # noqa: E402

real_collate = load_dataset.collate_skip_none
training_batches = []


def collate(batch):
    stacked = real_collate(batch)
    if stacked is not None and len(stacked) == 3:  # a training batch (validation has truths)
        training_batches.append(1)  # counted in the loader's worker, which persists
        if os.environ.get("RANK") == "1" and len(training_batches) == 2:
            return None
    return stacked


load_dataset.collate_skip_none = collate
sys.exit(train_model.main(sys.argv[1:]))
