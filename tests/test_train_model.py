"""train_model.py on tiny generated data: schedule, checkpoints, resume, logs, determinism."""
import csv
import shutil

import pytest
import torch

from demo_data import make_demo
import model as model_lib
import load_dataset
import train_model

TINY = ["--encoder", "resnet18", "--encoder-weights", "none", "--image-size", "64", "64",
        "--batch-size", "4", "--workers", "0", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    make_demo(root, count=20, seed=3)
    return root


def fresh_data(demo_data, tmp_path):
    """A private copy, so that split files and caches of one test never reach another."""
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    return data


def train(data, model_dir, *extra):
    return train_model.main(["--data", str(data), "--model-dir", str(model_dir), *TINY, *extra])


def read_log(model_dir):
    with open(model_dir / "resnet18_log.csv") as f:
        return list(csv.DictReader(f))


def test_learning_rate_drops_after_epoch_25_in_every_group():
    rates = [train_model.lr_for_epoch(e, 1e-4, 25, 1e-5) for e in range(1, 41)]
    assert rates[:25] == [1e-4] * 25
    assert rates[25:] == [1e-5] * 15
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    optimizer = torch.optim.Adam([{"params": model[0].parameters()},
                                  {"params": model[1].parameters(), "lr": 5e-4}], lr=1e-4)
    train_model.set_lr(optimizer, 1e-5)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-5, 1e-5]


def test_best_checkpoint_is_the_best_epoch_and_reloads_identically(demo_data, tmp_path):
    data, out = fresh_data(demo_data, tmp_path), tmp_path / "Model"
    assert train(data, out, "--epochs", "3", "--lr", "3e-3") == 0
    rows = read_log(out)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]  # one row per epoch
    ious = [float(r["valid_iou"]) for r in rows]
    best = torch.load(out / "resnet18.pth", weights_only=True)
    assert best["epoch"] == ious.index(max(ious)) + 1  # only an improving epoch rewrote it
    assert best["valid_iou"] == pytest.approx(max(ious), abs=1e-6)
    assert (out / "resnet18_curves.png").stat().st_size > 0

    # the resume state of the last epoch holds the trained model: the best checkpoint of a
    # one-epoch run must rebuild a model with exactly its outputs
    last = torch.load(out / "resnet18_last.pth", weights_only=True)
    trained = model_lib.model_from_checkpoint(last).eval()
    reloaded = model_lib.model_from_checkpoint(best).eval()
    if best["epoch"] == 3:
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            assert torch.equal(trained(x), reloaded(x))
    assert best["image_size"] == [64, 64] and best["encoder"] == "resnet18"


@pytest.mark.parametrize("depth, size", [(3, (40, 56)), (4, (48, 80)), (5, (64, 96))])
def test_model_output_has_the_input_size_at_every_depth(depth, size):
    model = model_lib.build_model("resnet18", None, depth).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, *size)).shape == (1, 1, *size)


def test_best_checkpoint_round_trip_gives_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = model_lib.build_model("resnet18", None, 5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(2, 3, 64, 64)
    loss = torch.sigmoid(model(x)).mean()
    loss.backward()
    optimizer.step()  # weights and batch-norm statistics differ from a fresh model
    settings = {"encoder": "resnet18", "encoder_depth": 5, "image_size": (64, 64),
                "threshold": 0.5, "demo": False, "data": "d", "split_file": "s"}
    path = tmp_path / "m.pth"
    model_lib.save_checkpoint(model_lib.checkpoint_record(model, settings, 1, 0.5), path)
    ckpt = torch.load(path, weights_only=True)
    rebuilt = model_lib.model_from_checkpoint(ckpt).eval()
    with torch.no_grad():
        assert torch.equal(model.eval()(x), rebuilt(x))


def test_resumed_run_matches_straight_run(demo_data, tmp_path):
    data = fresh_data(demo_data, tmp_path)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    schedule = ["--lr", "1e-3", "--lr-drop-epoch", "2", "--lr-after-drop", "1e-4"]
    assert train(data, straight, "--epochs", "3", *schedule) == 0
    assert train(data, resumed, "--epochs", "2", *schedule) == 0
    assert train(data, resumed, "--epochs", "3", "--resume", *schedule) == 0
    a, b = read_log(straight), read_log(resumed)
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == ["1", "2", "3"]
    assert [float(r["lr"]) for r in b] == [1e-3, 1e-3, 1e-4]
    for ra, rb in zip(a, b):
        assert float(ra["train_loss"]) == pytest.approx(float(rb["train_loss"]), abs=1e-4)


def test_finished_run_resumed_does_nothing(demo_data, tmp_path, capsys):
    data, out = fresh_data(demo_data, tmp_path), tmp_path / "Model"
    assert train(data, out, "--epochs", "1") == 0
    before = (out / "resnet18_last.pth").stat().st_mtime_ns
    capsys.readouterr()
    assert train(data, out, "--epochs", "1", "--resume") == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (out / "resnet18_last.pth").stat().st_mtime_ns == before


def test_same_seed_same_first_epoch_loss(demo_data, tmp_path):
    data = fresh_data(demo_data, tmp_path)
    assert train(data, tmp_path / "a", "--epochs", "1") == 0
    assert train(data, tmp_path / "b", "--epochs", "1") == 0
    assert read_log(tmp_path / "a")[0]["train_loss"] == read_log(tmp_path / "b")[0]["train_loss"]


@pytest.mark.parametrize("flags, constant", [
    (["--image-size", "100", "64"], "IMAGE_SIZE"),
    (["--encoder", "resnet_nonexistent"], "ENCODER"),
    (["--threshold", "1.5"], "THRESHOLD"),
    (["--batch-size", "500"], "BATCH_SIZE"),
])
def test_wrong_setting_is_refused_naming_the_constant(demo_data, tmp_path, flags, constant):
    data = fresh_data(demo_data, tmp_path)
    with pytest.raises(SystemExit) as stop:
        train(data, tmp_path / "Model", "--epochs", "1", *flags)
    message = str(stop.value.code)
    assert constant in message and "\n" not in message.strip()
    assert not (tmp_path / "Model" / "resnet18.pth").exists()
