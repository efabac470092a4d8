"""train_model.py on tiny generated data: schedule, checkpoints, resume, logs, determinism."""
import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from demo_data import make_demo
import model as model_lib
import load_dataset
import test_model
import train_model
import checkpoint as ckpt_lib
import engine
import settings as settings_lib
from conftest import REPO, record_of  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "isic_sample"
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
    with open(model_dir / "fpn_resnet18_log.csv") as f:
        return list(csv.DictReader(f))


def test_learning_rate_drops_after_epoch_25_in_every_group():
    rates = [engine.lr_for_epoch(e, 1e-4, 25, 1e-5) for e in range(1, 41)]
    assert rates[:25] == [1e-4] * 25
    assert rates[25:] == [1e-5] * 15
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    optimizer = torch.optim.Adam([{"params": model[0].parameters()},
                                  {"params": model[1].parameters(), "lr": 5e-4}], lr=1e-4)
    engine.set_lr(optimizer, 1e-5)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-5, 1e-5]
    assert [g["lr"] for g in optimizer.state_dict()["param_groups"]] == [1e-5, 1e-5]


def test_best_checkpoint_holds_the_weights_of_the_best_epoch(demo_data, tmp_path):
    data, out = fresh_data(demo_data, tmp_path), tmp_path / "Model"
    assert train(data, out, "--epochs", "3", "--lr", "3e-3") == 0
    rows = read_log(out)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]  # one row per epoch
    ious = [float(r["valid_iou"]) for r in rows]
    best = torch.load(out / "fpn_resnet18.pth", weights_only=True)
    assert best["epoch"] == ious.index(max(ious)) + 1  # only an improving epoch rewrote it
    assert best["valid_iou"] == pytest.approx(max(ious), abs=1e-6)
    assert best["settings"]["image_size"] == [64, 64]
    assert (best["settings"]["arch"], best["settings"]["encoder"]) == ("FPN", "resnet18")
    assert (out / "fpn_resnet18_curves.png").stat().st_size > 0

    # runs repeat bit for bit, so a run stopped at the best epoch ends with exactly the
    # weights the best checkpoint holds, whichever epoch that was
    again = tmp_path / "again"
    assert train(data, again, "--epochs", str(best["epoch"]), "--lr", "3e-3") == 0
    at_best = torch.load(again / "fpn_resnet18_last.pth", weights_only=True)["model_state"]
    assert best["model_state"].keys() == at_best.keys()
    assert all(torch.equal(best["model_state"][k], at_best[k]) for k in at_best)
    if best["epoch"] < 3:  # and the last state is another model: the comparison can fail
        last = torch.load(out / "fpn_resnet18_last.pth", weights_only=True)["model_state"]
        assert not all(torch.equal(last[k], at_best[k]) for k in at_best)


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
    ckpt_lib.save_checkpoint(record_of(model, settings, 1, 0.5), path)
    ckpt = torch.load(path, weights_only=True)
    rebuilt = ckpt_lib.model_from_checkpoint(ckpt).eval()
    with torch.no_grad():
        assert torch.equal(model.eval()(x), rebuilt(x))


def test_resumed_run_with_loader_workers_is_bit_identical_to_a_straight_run(demo_data, tmp_path):
    """With WORKERS=2 (workers persist across epochs in the straight run, start afresh in the
    resumed one): same weights, optimiser state, losses and validation scores, bit for bit."""
    data = fresh_data(demo_data, tmp_path)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    flags = ["--workers", "2", "--lr", "1e-3", "--lr-drop-epoch", "3", "--lr-after-drop", "1e-4"]
    assert train(data, straight, "--epochs", "4", *flags) == 0
    assert train(data, resumed, "--epochs", "2", *flags) == 0
    assert train(data, resumed, "--epochs", "4", "--resume", *flags) == 0
    a, b = read_log(straight), read_log(resumed)
    for row in a + b:
        del row["seconds"]
    assert a == b and [r["epoch"] for r in b] == ["1", "2", "3", "4"]
    last_a = torch.load(straight / "fpn_resnet18_last.pth", weights_only=True)
    last_b = torch.load(resumed / "fpn_resnet18_last.pth", weights_only=True)
    assert all(torch.equal(last_a["model_state"][k], last_b["model_state"][k])
               for k in last_a["model_state"])
    moments_a = last_a["optimizer_state"]["state"]
    moments_b = last_b["optimizer_state"]["state"]
    assert all(torch.equal(moments_a[i]["exp_avg"], moments_b[i]["exp_avg"]) for i in moments_a)
    # the rate the optimiser holds after the drop, read back from it, in every group
    assert {g["lr"] for g in last_b["optimizer_state"]["param_groups"]} == {1e-4}
    assert "scaler_state" in last_b  # None on the CPU; the GradScaler's state on float16 CUDA


def test_validation_in_the_csv_is_what_evaluate_reports_with_the_checkpoints_normalisation(
        demo_data, tmp_path, capsys):
    """Validation scores each image at its original size as --evaluate does, and inference
    uses the normalisation saved in the checkpoint, not a constant of its own."""
    data, out = fresh_data(demo_data, tmp_path), tmp_path / "Model"
    odd = ["--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5"]
    # loader workers, the cache and test_model's own defaults: the settings a user runs
    assert train(data, out, "--epochs", "3", "--lr", "3e-3", "--workers", "2", *odd) == 0
    best = ckpt_lib.load_checkpoint(out / "fpn_resnet18.pth")
    assert best["settings"]["mean"] == [0.5] * 3 and best["settings"]["std"] == [0.5] * 3
    row = read_log(out)[best["epoch"] - 1]
    # the console's row of that epoch: IoU, Dice and thresholded Jaccard as in the CSV
    console = next(line.split() for line in capsys.readouterr().out.splitlines()
                   if line.split()[:1] == [str(best["epoch"])])
    assert [float(v) for v in console[4:7]] == pytest.approx(
        [float(row[f"valid_{k}"]) for k in ("iou", "dice", "threshold_jaccard")], abs=1e-4)
    assert test_model.main(["--checkpoint", str(out / "fpn_resnet18.pth"), "--evaluate",
                            "--split", "valid"]) == 0
    summary = json.loads((out / "evaluation" / "fpn_resnet18" / "valid" / "summary.json")
                         .read_text())
    assert summary["images"] == 2 and summary["epoch"] == best["epoch"]
    assert summary["settings"]["lr"] == 3e-3 and summary["settings"] == best["settings"]
    assert summary["models"][0]["arch"] == "FPN"
    for key in ("iou", "dice", "threshold_jaccard"):
        assert summary[key] == pytest.approx(float(row[f"valid_{key}"]), abs=1e-4), key
    assert 0.0 < summary["iou"] < 1.0  # a real comparison, not two empty masks
    # a summary to read, a training run's whole settings record included
    lines = (out / "evaluation" / "fpn_resnet18" / "valid" / "summary.json").read_text()
    assert len(lines.splitlines()) < 150


def test_finished_run_resumed_does_nothing(demo_data, tmp_path, capsys):
    data, out = fresh_data(demo_data, tmp_path), tmp_path / "Model"
    assert train(data, out, "--epochs", "1") == 0
    before = (out / "fpn_resnet18_last.pth").stat().st_mtime_ns
    capsys.readouterr()
    assert train(data, out, "--epochs", "1", "--resume") == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (out / "fpn_resnet18_last.pth").stat().st_mtime_ns == before


def test_a_new_run_over_an_earlier_one_stops_unless_told_and_a_resume_does_not(demo_data,
                                                                               tmp_path, capsys):
    data, out = fresh_data(demo_data, tmp_path), tmp_path / "Model"
    assert train(data, out, "--epochs", "1") == 0
    assert "replaces" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:  # before training, naming the ways on
        train(data, out, "--epochs", "1")
    assert str(stop.value.code) == (
        f"error: {out} already holds the run fpn_resnet18 (epoch 1 of 1, data {data.resolve()}): "
        f"pass --resume to continue it, --model-dir NEW to keep both, or --replace to start it "
        f"over")
    assert train(data, out, "--epochs", "1", "--replace") == 0
    assert [line for line in capsys.readouterr().out.splitlines() if "replaces" in line] == [
        f"note: this new run replaces the earlier one in {out} (fpn_resnet18.pth, fpn_resnet18_last.pth, "
        f"fpn_resnet18_log.csv, fpn_resnet18_curves.png)"]
    assert train(data, out, "--epochs", "2", "--resume") == 0
    assert "replaces" not in capsys.readouterr().out
    (out / "fpn_resnet18_last.pth").unlink()  # --resume with no state starts over, over the rest
    assert train(data, out, "--epochs", "1", "--resume", "--replace") == 0
    assert [line for line in capsys.readouterr().out.splitlines() if "replaces" in line] == [
        f"note: this new run replaces the earlier one in {out} (fpn_resnet18.pth, fpn_resnet18_log.csv, "
        f"fpn_resnet18_curves.png)"]


@pytest.mark.parametrize("flags, expected", [
    ([], dict(epochs=8, lr=1e-3, encoder="resnet18", encoder_weights=None, data="data/demo")),
    # a flag given with the default's own value still wins over the demo's
    (["--epochs", "40", "--lr", "1e-4", "--encoder", "se_resnext50_32x4d", "--encoder-weights",
      "imagenet", "--data", "data"],
     dict(epochs=40, lr=1e-4, encoder="se_resnext50_32x4d", encoder_weights="imagenet",
          data="data")),
    (["--epochs", "3"], dict(epochs=3, lr=1e-3, encoder="resnet18")),
])
def test_demo_settings_yield_to_every_flag_on_the_command_line(flags, expected):
    args = train_model.parse_args(["--demo", *flags])
    assert {key: getattr(args, key) for key in expected} == expected
    assert args.image_size == (96, 96) and args.lr_drop_epoch == 6


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
    assert not (tmp_path / "Model" / "fpn_resnet18.pth").exists()


def test_the_model_learns_real_lesions_until_it_fits_them(tmp_path):
    """The FPN, the Dice loss and the epoch loop fit the 12 real ISIC fixture pairs: IoU of at
    least 0.85 on them, scored as validation scores (per image, at original size). One batch of
    all 12, no augmentation; about 40 s on one CPU thread."""
    data = tmp_path / "isic_sample"
    shutil.copytree(FIXTURES, data)
    pairs = load_dataset.scan(data).splits["train"]
    assert len(pairs) == 12
    torch.manual_seed(0)
    model = model_lib.build_model("resnet18", None, 5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = model_lib.make_loss()
    train_loader = load_dataset.make_loader(pairs, (96, 96), batch_size=12)
    score_loader = load_dataset.make_loader(pairs, (96, 96), batch_size=12, truth=True)
    trainer = engine.Trainer(model, loss_fn, torch.device("cpu"), optimizer)
    before = engine.validate(trainer, score_loader, threads=1)["iou"]
    for epoch in range(1, 61):
        engine.set_lr(optimizer, engine.lr_for_epoch(epoch, 1e-3, 45, 1e-4))
        engine.train_one_epoch(trainer, train_loader, epoch, [], progress=False)
    fitted = engine.validate(trainer, score_loader, threads=1)
    assert fitted["images"] == 12
    assert before < 0.5 and fitted["iou"] >= 0.85, (before, fitted["iou"])


# ----------------------------------------------------------------------------- one home per setting

def test_a_new_setting_is_its_constant_and_its_row_and_gets_its_flag_recipe_and_resume_check(
        tmp_path):
    """A new setting is its constant and its row in SETTINGS (its use aside): that gives it a
    flag with the row's help and the constant's value as default, a place in the settings
    every checkpoint records, and a resume check that refuses another value."""
    import importlib.util

    source = Path(train_model.__file__).read_text()
    source = source.replace("SEED = 42\n", "CROP_MARGIN = 0\nSEED = 42\n", 1)
    source = source.replace('    Setting("SEED",', '    Setting("CROP_MARGIN", "pixels cut from '
                            'each border", FIXED),\n    Setting("SEED",', 1)
    path = tmp_path / "train_model_plus.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("train_model_plus", path)
    plus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plus)
    assert plus.parse_args([]).crop_margin == 0
    args = plus.parse_args(["--crop-margin", "3"])
    assert args.crop_margin == 3 and "crop_margin" in args.given
    help_text = " ".join(plus.build_parser().format_help().split())
    assert "--crop-margin CROP_MARGIN pixels cut from each border (default: 0)" \
        in help_text
    assert plus.run_settings(args)["crop_margin"] == 3
    torch.manual_seed(0)
    state = record_of(torch.nn.Linear(1, 1), {"crop_margin": 0})
    state.update(optimizer_state={}, best_iou=0.5, history=[], iter_log=[])
    last = tmp_path / "fpn_resnet18_last.pth"
    torch.save(state, last)
    with pytest.raises(settings_lib.SettingError, match=r"CROP_MARGIN=0, not 3"):
        plus.load_resume_state(last, args)


def test_an_architecture_is_one_line_and_two_on_one_encoder_keep_their_own_files(
        demo_data, tmp_path, monkeypatch, capsys):
    """One line in model.ARCHITECTURES adds a network: it trains beside an FPN on the same
    encoder in the same folder without touching the FPN's files, its checkpoint records it,
    and test_model.py rebuilds it from the checkpoint alone and names it."""
    monkeypatch.setitem(model_lib.ARCHITECTURES, "Linknet", model_lib.no_arguments)
    data, out = fresh_data(demo_data, tmp_path), tmp_path / "Model"
    assert train(data, out, "--epochs", "1") == 0
    fpn = (out / "fpn_resnet18.pth").read_bytes()
    assert train(data, out, "--epochs", "1", "--arch", "Linknet") == 0
    assert (out / "fpn_resnet18.pth").read_bytes() == fpn
    linknet = ckpt_lib.load_checkpoint(out / "linknet_resnet18.pth")
    assert linknet["settings"]["arch"] == "Linknet"
    assert type(ckpt_lib.model_from_checkpoint(linknet)).__name__ == "Linknet"
    with open(out / "linknet_resnet18_log.csv") as f:
        assert next(csv.DictReader(f))["network"] == "Linknet resnet18"
    capsys.readouterr()
    assert test_model.main(["--checkpoint", str(out / "linknet_resnet18.pth"), "--evaluate",
                            "--split", "valid", "--workers", "0"]) == 0
    assert "(given by --checkpoint; Linknet resnet18 at 64x64" in capsys.readouterr().out
    summary = json.loads((out / "evaluation" / "linknet_resnet18" / "valid" / "summary.json")
                         .read_text())
    assert summary["models"][0]["arch"] == "Linknet"
    report = (out / "evaluation" / "linknet_resnet18" / "valid" / "report.html").read_text()
    assert "Linknet resnet18" in report
    with pytest.raises(SystemExit, match="ARCH 'Nope' is not one of FPN, Unet"):
        train(data, out, "--epochs", "1", "--arch", "Nope")


def test_every_setting_has_a_flag_that_shows_its_true_default():
    """Every constant of the three scripts' settings blocks has its row, and its flag's
    default (shown in --help) is the constant's value."""
    import ast

    import export_model

    for script in (train_model, test_model, export_model):
        block = Path(script.__file__).read_text().split("# " + "-" * 77 + " settings")[1]
        block = block.split("SETTINGS = [")[0]
        constants = [t.id for node in ast.parse(block).body if isinstance(node, ast.Assign)
                     for t in node.targets]
        assert [s.name for s in script.SETTINGS] == constants, script.__name__
        args = script.parse_args([])
        for s in script.SETTINGS:
            assert getattr(args, s.key) == getattr(script, s.name), s.name
    help_text = " ".join(train_model.build_parser().format_help().split())
    assert "--cache, --no-cache decode and resize each image once, then read the small copy " \
           "(default: True)" in help_text
    assert "--image-size H W (height, width) every image is resized to (default: 320 320)" \
        in help_text
    test_help = " ".join(subprocess.run([sys.executable, "test_model.py", "--help"], cwd=REPO,
                                        capture_output=True, text=True).stdout.split())
    assert "--mixed-precision, --no-mixed-precision" in test_help
    assert "--channels-last, --no-channels-last" in test_help


# ----------------------------------------------------------------------------- resume and data

def interrupt_in_epoch(monkeypatch, epoch):
    """Ctrl-C at the start of the given epoch's training."""
    real = engine.train_one_epoch

    def train_or_stop(trainer, loader, at, *args, **kwargs):
        if at == epoch:
            raise KeyboardInterrupt
        return real(trainer, loader, at, *args, **kwargs)
    monkeypatch.setattr(train_model, "train_one_epoch", train_or_stop)


def test_resume_alone_restores_the_run_and_ends_as_a_straight_run(demo_data, tmp_path,
                                                                   monkeypatch, capsys):
    data, straight, resumed = fresh_data(demo_data, tmp_path), tmp_path / "a", tmp_path / "b"
    flags = ["--epochs", "3", "--lr", "3e-3", "--seed", "5"]
    assert train(data, straight, *flags) == 0
    interrupt_in_epoch(monkeypatch, 3)
    with pytest.raises(SystemExit):
        train(data, resumed, *flags)
    monkeypatch.undo()
    capsys.readouterr()
    # only the model folder: data, encoder, size, recipe and the machine settings of before
    assert train_model.main(["--model-dir", str(resumed), "--resume", "--workers", "0",
                             "--quiet"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == (f"resuming after epoch 2 (best valid IoU {read_best(resumed):.4f}) of "
                     f"{resumed / 'fpn_resnet18_last.pth'}: FPN resnet18, data {data.resolve()}, "
                     f"3 epochs in all")
    a, b = read_log(straight), read_log(resumed)
    for row in a + b:
        del row["seconds"]
    assert a == b
    last_a = torch.load(straight / "fpn_resnet18_last.pth", weights_only=True)["model_state"]
    last_b = torch.load(resumed / "fpn_resnet18_last.pth", weights_only=True)["model_state"]
    assert all(torch.equal(last_a[k], last_b[k]) for k in last_a)


def read_best(model_dir):
    return max(float(r["valid_iou"]) for r in read_log(model_dir)[:2])


def test_resume_refuses_other_data_and_another_encoder_in_one_line(demo_data, tmp_path):
    data, out = fresh_data(demo_data, tmp_path), tmp_path / "Model"
    assert train(data, out, "--epochs", "1") == 0
    other = tmp_path / "other"
    make_demo(other, count=20, seed=4)  # the same ids, other images
    for flags, expected in (
            (["--data", str(other)], "trained on other images than"),
            (["--encoder", "resnet34"], "was made with ENCODER='resnet18', not 'resnet34'")):
        with pytest.raises(SystemExit) as stop:
            train_model.main(["--model-dir", str(out), "--resume", "--epochs", "2", "--quiet",
                              "--workers", "0", *flags])
        message = str(stop.value.code)
        assert expected in message and "\n" not in message and "--model-dir" in message
    assert len(read_log(out)) == 1


def test_a_run_on_other_data_into_the_same_model_folder_stops_before_training(demo_data,
                                                                              tmp_path, capsys):
    data, out = fresh_data(demo_data, tmp_path), tmp_path / "Model"
    assert train(data, out, "--epochs", "1") == 0
    other = tmp_path / "other"
    make_demo(other, count=20, seed=4)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        train(other, out, "--epochs", "1", "--folds", "2", "--fold", "0")
    assert str(stop.value.code) == (
        f"error: {out} holds fpn_resnet18_last.pth, trained on other data ({data.resolve()}): pass "
        f"--model-dir NEW to keep the runs apart (one model folder per dataset), or --replace "
        f"to train here anyway")
    assert "train_loss" not in capsys.readouterr().out  # no epoch began
    assert not (out / "fpn_resnet18_fold0_last.pth").exists()


def test_under_torchrun_the_silenced_console_is_closed_and_given_back(demo_data, tmp_path,
                                                                     monkeypatch):
    import os
    import sys
    opened = []

    def silence(args):  # what setup_processes does in a process other than the first
        opened.append(open(os.devnull, "w"))
        sys.stdout = opened[0]
    monkeypatch.setattr(train_model, "setup_processes", silence)
    console = sys.stdout
    with pytest.raises(SystemExit):
        train(tmp_path / "no_data", tmp_path / "Model", "--epochs", "1")
    assert sys.stdout is console and opened[0].closed


# ----------------------------------------------------------------------------- training levers

def test_learning_rate_plans_warm_up_then_follow_their_rule_step_by_step():
    rates = [engine.lr_at_step(t, engine.LRPlan("cosine", 1e-3, 10, warmup=2))
             for t in range(10)]
    assert rates[:2] == pytest.approx([5e-4, 1e-3])  # linear, reaching LR at the last step
    # then a half cosine over the 8 steps left: 1e-3 * (1 + cos(pi * k / 8)) / 2
    assert rates[2:] == pytest.approx([1e-3 * (1 + math.cos(math.pi * k / 8)) / 2
                                       for k in range(8)])
    poly = engine.LRPlan("poly", 1e-2, 4)
    assert [engine.lr_at_step(t, poly) for t in range(4)] == pytest.approx(
        [1e-2, 1e-2 * 0.75 ** 0.9, 1e-2 * 0.5 ** 0.9, 1e-2 * 0.25 ** 0.9])
    # the step rule without warm-up: the paper's epoch rule, at each epoch's steps
    step = engine.LRPlan("step", 1e-4, 40 * 3, drop=25 * 3, lr_after=1e-5)
    assert [engine.lr_at_step(t, step) for t in range(0, 120, 3)] == \
        [engine.lr_for_epoch(e, 1e-4, 25, 1e-5) for e in range(1, 41)]
    args = train_model.parse_args(["--epochs", "13", "--lr-drop-epoch", "10"])
    assert train_model.lr_plan(args, 27) is None  # the paper's: set once an epoch, as before
    args = train_model.parse_args(["--epochs", "13", "--schedule", "cosine",
                                   "--warmup-epochs", "0.5"])
    assert train_model.lr_plan(args, 27) == engine.LRPlan("cosine", 1e-4, 351, 14, 675, 1e-5)


def test_the_weight_average_warms_up_its_decay_and_copies_integer_buffers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    average = engine.WeightAverage(model, decay=0.5)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model.train()(torch.randn(4, 3))  # batch-norm statistics and batch count move
    average.update(model)  # the first update: decay min(0.5, 2/11)
    d = 2 / 11
    now = model.state_dict()
    for key, mine in average.model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            assert mine.item() == now[key].item() == 1
        else:
            assert torch.allclose(mine, d * start[key] + (1 - d) * now[key]), key
    average.update(model)  # the second: min(0.5, 3/12) = 0.25, towards the same weights
    expected = 0.25 * (d * start["0.weight"] + (1 - d) * now["0.weight"]) + 0.75 * now["0.weight"]
    assert torch.allclose(average.model[0].weight, expected)
    assert average.updates == 2 and not average.model[0].weight.requires_grad
    average.decay = 0.0
    assert engine.evaluated(engine.Trainer(model, None, torch.device("cpu"),
                                           average=average)).model is average.model


LEVERS = {"cosine": ["--schedule", "cosine", "--warmup-epochs", "1", "--optimizer", "adamw",
                     "--weight-decay", "0.05", "--ema-decay", "0.9", "--loss", "dice+bce",
                     "--early-epochs", "2", "--early-image-size", "32", "32", "--workers", "1"],
          "poly": ["--schedule", "poly", "--optimizer", "sgd", "--lr", "1e-2",
                   "--weight-decay", "3e-5", "--ema-decay", "0.9", "--loss", "lovasz",
                   "--deep-supervision"]}


@pytest.mark.parametrize("lever", LEVERS)
def test_resume_with_every_lever_on_ends_bit_for_bit_as_a_straight_run(demo_data, tmp_path,
                                                                       monkeypatch, lever):
    """Stopped in epoch 3 and resumed: the per-step rates, the weights, their average (the
    run's model), the optimiser and the CSV as a straight run's; the CSV's best validation
    is what --evaluate reports of the best checkpoint, the average. With progressive resizing
    (cosine), epochs 1 and 2 train at 32x32 and the resumed epoch 3 at 64x64; that straight run
    reads through a loader worker (as the default WORKERS does), the resumed one in-process."""
    data, straight, resumed = fresh_data(demo_data, tmp_path), tmp_path / "a", tmp_path / "b"
    flags = ["--epochs", "3", *LEVERS[lever]]
    sizes, real = {}, engine.train_one_epoch

    def train_and_note_size(trainer, loader, at, *args, **kwargs):
        sizes[at] = next(iter(loader))[0].shape[-2:]
        return real(trainer, loader, at, *args, **kwargs)
    monkeypatch.setattr(train_model, "train_one_epoch", train_and_note_size)
    assert train(data, straight, *flags) == 0
    monkeypatch.undo()
    assert sizes == ({1: (32, 32), 2: (32, 32), 3: (64, 64)} if lever == "cosine" else
                     {1: (64, 64), 2: (64, 64), 3: (64, 64)})
    interrupt_in_epoch(monkeypatch, 3)
    with pytest.raises(SystemExit):
        train(data, resumed, *flags)
    monkeypatch.undo()
    assert train(data, resumed, "--resume") == 0
    a, b = read_log(straight), read_log(resumed)
    for row in a + b:
        del row["seconds"]
    assert a == b and len(b) == 3
    # the last epoch's rate: the plan's at the run's last step (4 steps an epoch)
    plan = engine.LRPlan(lever, 1e-2 if lever == "poly" else 1e-4, 12, 4 if lever == "cosine"
                         else 0)
    assert float(b[-1]["lr"]) == pytest.approx(engine.lr_at_step(11, plan))
    last_a = torch.load(straight / "fpn_resnet18_last.pth", weights_only=True)
    last_b = torch.load(resumed / "fpn_resnet18_last.pth", weights_only=True)
    for key in ("model_state", "trained_model_state"):
        assert all(torch.equal(last_a[key][k], last_b[key][k]) for k in last_a[key]), key
    assert last_a["average_updates"] == last_b["average_updates"] == 12
    if lever == "poly":  # the deep supervision heads are in the resume state, not the model's
        heads_a, heads_b = last_a["deep_supervision_state"], last_b["deep_supervision_state"]
        assert len(heads_a) == 6 and all(torch.equal(heads_a[k], heads_b[k]) for k in heads_a)
        assert not any(k.startswith("deep") for k in last_b["model_state"])
    moments = "exp_avg" if lever == "cosine" else "momentum_buffer"
    state_a, state_b = last_a["optimizer_state"]["state"], last_b["optimizer_state"]["state"]
    assert all(torch.equal(state_a[i][moments], state_b[i][moments]) for i in state_a)
    # the run's model is the average, not the weights trained last
    assert not all(torch.equal(last_b["model_state"][k], last_b["trained_model_state"][k])
                   for k in last_b["model_state"])
    best = ckpt_lib.load_checkpoint(resumed / "fpn_resnet18.pth")
    if best["epoch"] == 3:
        assert all(torch.equal(best["model_state"][k], last_b["model_state"][k])
                   for k in last_b["model_state"])
    assert test_model.main(["--checkpoint", str(resumed / "fpn_resnet18.pth"), "--evaluate",
                            "--split", "valid"]) == 0
    summary = json.loads((resumed / "evaluation" / "fpn_resnet18" / "valid" / "summary.json")
                         .read_text())
    assert summary["iou"] == pytest.approx(float(b[best["epoch"] - 1]["valid_iou"]), abs=1e-4)


@pytest.mark.parametrize("flags, says", [
    (["--early-image-size", "48", "48"], r"EARLY_IMAGE_SIZE=\(48, 48\) breaks the size rule"),
    (["--early-image-size", "96", "64"], r"larger than IMAGE_SIZE=\(64, 64\)"),
    (["--epochs", "2", "--early-image-size", "32", "32"], r"EARLY_EPOCHS=2 leaves no epoch at IMAGE_SIZE")])
def test_progressive_resizing_refuses_a_size_it_cannot_train(flags, says):
    args = train_model.parse_args([*TINY, "--epochs", "3", "--early-epochs", "2", *flags])
    with pytest.raises(settings_lib.SettingError, match=says):
        train_model.check_settings(args)
    args = train_model.parse_args([*TINY, "--epochs", "3", "--early-epochs", "2",
                                   "--early-image-size", "32", "64"])
    train_model.check_settings(args)  # smaller in one side, a multiple of 32: allowed


def test_the_three_losses_summed_give_their_known_values_at_zero_logits():
    """At logits 0 (probability 1/2 everywhere) on masks half lesion: Dice loss 1 - 0.5/(0.5 +
    0.5) = 0.5, cross-entropy ln 2, and the Lovasz hinge 1 per image (every pixel's hinge error
    is 1, and the Lovasz extension at errors all 1 is the Jaccard loss of every pixel wrong)."""
    assert "dice+bce+lovasz" in model_lib.LOSSES
    logits = torch.zeros(2, 1, 4, 4)
    masks = torch.zeros(2, 1, 4, 4)
    masks[:, :, :2] = 1.0
    parts = {name: model_lib.make_loss(name)(logits, masks).item()
             for name in ("dice", "dice+bce", "lovasz", "dice+bce+lovasz")}
    assert parts["dice"] == pytest.approx(0.5, abs=1e-6)
    assert parts["dice+bce"] == pytest.approx(0.5 + math.log(2), abs=1e-6)
    assert parts["lovasz"] == pytest.approx(1.0, abs=1e-6)
    assert parts["dice+bce+lovasz"] == pytest.approx(1.5 + math.log(2), abs=1e-6)


def test_deep_supervision_adds_each_levels_loss_at_its_size_and_leaves_the_model_file_as_is():
    torch.manual_seed(0)
    net = model_lib.attach_deep_supervision(model_lib.build_model("resnet18", None, 5, "FPN"))
    base = model_lib.make_loss("dice+bce")
    loss = model_lib.DeepSupervisedLoss(base, net)
    images = torch.randn(2, 3, 64, 64)
    masks = torch.zeros(2, 1, 64, 64)
    masks[:, :, 8:40, 16:48] = 1.0  # 32x32 of lesion: whole cells at 1/8 and 1/16
    net.train()
    logits = net(images)
    kept = [getattr(net.decoder, n).kept_output for n in model_lib.DEEP_LEVELS]
    assert [tuple(k.shape[-2:]) for k in kept] == [(2, 2), (4, 4), (8, 8)]
    heads = getattr(net, model_lib.DEEP_KEY)
    small = [torch.zeros(2, 1, s, s) for s in (2, 4, 8)]
    small[2][:, :, 1:5, 2:6] = 1.0
    # cells of 16 px: rows 8:40 cover half of cell 0, cell 1 and half of cell 2 (half counts)
    small[1][:, :, 0:3, 1:3] = 1.0
    # cells of 32 px: at most 3/4 x 1/2 of a cell is lesion, under the half: none
    expected = (1.0 * base(logits, masks) + sum(
        w * base(h(k.float()), m) for w, h, k, m in zip((0.5, 0.25, 0.125), heads, kept, small))
    ) / 1.875
    assert loss(logits, masks).item() == pytest.approx(expected.item(), rel=1e-6)
    assert all(getattr(net.decoder, n).kept_output is None for n in model_lib.DEEP_LEVELS)
    net.eval()  # validation: the output's loss alone
    with torch.no_grad():
        logits = net(images)
        assert loss(logits, masks).item() == pytest.approx(base(logits, masks).item())
    ckpt = ckpt_lib.make_checkpoint(net, {"settings": {}}, 1, 0.5)
    plain = model_lib.build_model("resnet18", None, 5, "FPN")
    plain.load_state_dict(ckpt["model_state"])  # strict: no head, nothing missing
    with torch.no_grad():
        assert torch.equal(plain.eval()(images), net(images))
