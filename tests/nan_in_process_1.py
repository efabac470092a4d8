"""train_model.py under torchrun with a loss that turns NaN at the second step of process 1
only: what a bad batch on one GPU does. Used by tests/test_distributed.py."""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model  # noqa: E402
import train_model  # noqa: E402

real_loss = model.make_loss


def make_loss(name="dice"):
    loss, steps = real_loss(name), []

    def planted(logits, masks):
        value = loss(logits, masks)
        if torch.is_grad_enabled():  # a training step, not validation
            steps.append(1)
            if os.environ.get("RANK") == "1" and len(steps) == 2:
                return value * float("nan")
        return value
    return planted


model.make_loss = make_loss
sys.exit(train_model.main(sys.argv[1:]))
