"""train_model.py under torchrun with --deep-supervision, where each process writes the sum of
every parameter's gradient at its first step (the deep supervision heads are the last six:
three 1x1 convolutions) to grads_RANK.json in the model folder. Used by
tests/test_distributed.py."""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engine  # noqa: E402
import train_model  # noqa: E402

real_step = engine.optimizer_step
steps = []


def optimizer_step(loss, optimizer, scaler=None):
    real_step(loss, optimizer, scaler)
    if not steps:  # the gradients stay until the next step's zero_grad
        sums = [p.grad.double().sum().item() for g in optimizer.param_groups for p in g["params"]]
        folder = Path(sys.argv[sys.argv.index("--model-dir") + 1])
        (folder / f"grads_{os.environ['RANK']}.json").write_text(json.dumps(sums))
    steps.append(1)


engine.optimizer_step = optimizer_step
sys.exit(train_model.main(sys.argv[1:]))
