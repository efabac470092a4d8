"""train_model.py under `torchrun --nproc_per_node=2` with gloo on the CPU: one log and one
checkpoint, validation over every image once, an exact resume, a NaN in one process
stopping both, an empty batch in one process skipped by both, and the deep supervision heads'
gradients averaged over the processes."""
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import demo_data
import test_model
import checkpoint as ckpt_lib

REPO = Path(__file__).resolve().parents[1]
TINY = ["--encoder", "resnet18", "--encoder-weights", "none", "--image-size", "64", "64",
        "--batch-size", "4", "--workers", "1", "--lr", "1e-3", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp") / "data"
    demo_data.make_demo(root, 30, 5)  # 24 train, 3 valid (odd: 2 + 1 over two processes), 3 test
    return root


def torchrun(data, model_dir, *extra, script="train_model.py"):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", str(REPO / script), "--data", str(data),
               "--model-dir", str(model_dir), *TINY, *extra]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def log_rows(model_dir):
    with open(model_dir / "fpn_resnet18_log.csv") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        del row["seconds"]
    return rows


def test_two_processes_write_one_log_and_validate_every_image_once(data, tmp_path):
    out = tmp_path / "Model"
    run = torchrun(data, out, "--epochs", "3")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.splitlines()[0].startswith("2 processes on cpu (gloo); BATCH_SIZE=")
    assert run.stdout.count("best valid IoU") == 1  # the second process stays silent
    assert sorted(p.name for p in out.iterdir()) == [
        "fpn_resnet18.pth", "fpn_resnet18_curves.png", "fpn_resnet18_data.txt", "fpn_resnet18_last.pth",
        "fpn_resnet18_log.csv"]
    best = ckpt_lib.load_checkpoint(out / "fpn_resnet18.pth")
    assert not any(k.startswith("module.") for k in best["model_state"])
    row = log_rows(out)[best["epoch"] - 1]
    # the saved model, in one process, scores the 3 validation images as the two did together
    assert test_model.main(["--checkpoint", str(out / "fpn_resnet18.pth"), "--evaluate",
                            "--split", "valid", "--device", "cpu"]) == 0
    summary = json.loads((out / "evaluation" / "fpn_resnet18" / "valid" / "summary.json").read_text())
    assert summary["images"] == 3
    for key in ("iou", "dice", "threshold_jaccard"):
        assert summary[key] == pytest.approx(float(row[f"valid_{key}"]), abs=1e-4), key
    assert 0 < summary["iou"] < 1 and summary["specificity"] > 0  # not an all-lesion mask


def test_resume_under_torchrun_ends_with_the_log_of_a_straight_run(data, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert torchrun(data, straight, "--epochs", "3").returncode == 0
    assert torchrun(data, resumed, "--epochs", "1").returncode == 0
    run = torchrun(data, resumed, "--epochs", "3", "--resume")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "resuming after epoch 1" in run.stdout
    assert log_rows(resumed) == log_rows(straight)
    a = torch.load(straight / "fpn_resnet18_last.pth", weights_only=True)["model_state"]
    b = torch.load(resumed / "fpn_resnet18_last.pth", weights_only=True)["model_state"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_nan_in_one_process_stops_both_naming_epoch_and_step(data, tmp_path):
    started = time.monotonic()
    run = torchrun(data, tmp_path / "Model", "--epochs", "2", script="tests/nan_in_process_1.py")
    assert time.monotonic() - started < 120  # stopped, not left waiting for a timeout
    assert run.returncode != 0
    assert "at epoch 1, step 2" in run.stderr and "training loss became" in run.stderr
    assert not (tmp_path / "Model" / "fpn_resnet18.pth").exists()


def test_an_empty_batch_in_one_process_is_skipped_by_both(data, tmp_path):
    """Process 1 loses its second batch of epoch 1 (4 images): both skip that step together
    instead of one waiting for the other in the gradient all-reduce."""
    started = time.monotonic()
    run = torchrun(data, tmp_path / "Model", "--epochs", "1",
                   script="tests/empty_batch_in_process_1.py")
    assert time.monotonic() - started < 120  # no process left waiting for a timeout
    assert run.returncode == 0, run.stderr[-2000:]
    # both processes skipped the step: 4 images unreadable, 4 read but not trained on
    assert "epoch 1: 4 training and 0 validation image(s) could not be read" in run.stdout
    assert "epoch 1: 4 training image(s) were read but skipped" in run.stdout
    assert len(log_rows(tmp_path / "Model")) == 1


def test_deep_supervision_heads_get_the_gradient_averaged_over_both_processes(data, tmp_path):
    out = tmp_path / "Model"
    out.mkdir()
    run = torchrun(data, out, "--epochs", "1", "--deep-supervision",
                   script="tests/deep_supervision_in_2_processes.py")
    assert run.returncode == 0, run.stderr[-2000:]
    grads = [json.loads((out / f"grads_{rank}.json").read_text()) for rank in (0, 1)]
    # each process trained on its own images, yet every gradient, the heads' included, is the same
    assert grads[0] == grads[1]
    assert len(grads[0]) > 6 and all(g != 0 for g in grads[0][-6:])
