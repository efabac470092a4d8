"""Models that outlive the code: the version-2 files of tests/fixtures/checkpoint_v2 (written by
an earlier commit, never rewritten; its README gives the command) load, evaluate, export and
resume; the migration chain; a setting added later; a full disk during a save."""
import errno
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import checkpoint
import export_model
import settings
import test_model
import train_model
from checkpoint import CheckpointError

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint_v2"
BEST = FIXTURE / "model" / "unet_tu-test_resnet.pth"
LAST = FIXTURE / "model" / "unet_tu-test_resnet_last.pth"
MACHINE = ["--workers", "0", "--device", "cpu", "--no-cache", "--no-mixed-precision", "--quiet"]


@pytest.fixture
def v2(tmp_path):
    """A copy of the fixture (evaluation and resume write beside the files)."""
    shutil.copytree(FIXTURE / "data", tmp_path / "data")
    shutil.copytree(FIXTURE / "model", tmp_path / "model")
    return tmp_path


def test_the_version_2_files_load_with_weights_only_as_written():
    for path in (BEST, LAST):
        raw = torch.load(path, map_location="cpu", weights_only=True)
        assert raw["format"] == checkpoint.CHECKPOINT_FORMAT and raw["version"] == 2
        ckpt = checkpoint.load_checkpoint(path)
        assert ckpt["settings"] == raw["settings"] and ckpt["epoch"] == 1
    assert checkpoint.load_checkpoint(BEST)["valid_iou"] == pytest.approx(0.4314, abs=1e-4)


def test_the_version_2_best_model_evaluates_to_the_validation_iou_it_recorded(v2, capsys):
    """Its record says valid IoU 0.4314 (per image at original size): the evaluation of the
    valid split by today's code gives it back."""
    out = v2 / "eval"
    assert test_model.main(["--checkpoint", str(v2 / "model" / BEST.name), "--evaluate",
                            "--split", "valid", "--data", str(v2 / "data"), "--out", str(out),
                            "--workers", "0", "--device", "cpu", "--no-mixed-precision"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 2
    assert summary["iou"] == pytest.approx(checkpoint.load_checkpoint(BEST)["valid_iou"],
                                           abs=1e-4)


def test_the_version_2_best_model_exports_to_onnx_that_runs(v2):
    onnx_path = v2 / "v2.onnx"
    assert export_model.main(["--checkpoint", str(v2 / "model" / BEST.name), "--out",
                              str(onnx_path), "--check-size", "40", "56"]) == 0
    image = np.random.default_rng(0).integers(0, 256, (45, 64, 3), dtype=np.uint8)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    prob, mask = session.run(None, {session.get_inputs()[0].name: image})
    assert prob.shape == mask.shape == (45, 64)
    assert set(np.unique(mask)) <= {0, 255}
    assert np.array_equal(mask == 255, prob >= checkpoint.load_checkpoint(BEST)["settings"]
                          ["threshold"])


def test_the_version_2_resume_state_resumes_for_one_more_epoch(v2, capsys):
    model_dir = v2 / "model"
    assert train_model.main(["--resume", "--model-dir", str(model_dir), "--data",
                             str(v2 / "data"), "--epochs", "2", *MACHINE]) == 0
    assert "resuming after epoch 1" in capsys.readouterr().out
    state = checkpoint.load_checkpoint(model_dir / LAST.name)
    old = checkpoint.load_checkpoint(LAST)
    assert state["epoch"] == 2 and state["version"] == checkpoint.CHECKPOINT_VERSION
    assert state["history"][0] == old["history"][0] and len(state["history"]) == 2
    # the record keeps what the run was, and gains each later setting at its older value
    older = {k: settings.plain(v) for k, v in settings.older_values(train_model.SETTINGS).items()
             if k not in old["settings"]}
    assert older and older["schedule"] == "step" and older["ema_decay"] == 0.0
    assert {k: v for k, v in state["settings"].items() if k not in ("data", "epochs")} == \
        {k: v for k, v in {**old["settings"], **older}.items() if k not in ("data", "epochs")}


# ----------------------------------------------------------------------------- versions

def test_a_migration_step_upgrades_an_older_version(monkeypatch, capsys):
    """A format change is CHECKPOINT_VERSION + 1 and one step in MIGRATIONS: the version-2 file
    then reads as the new version, through load_checkpoint and checkpoint_fields alike."""
    def rename_epoch(ckpt):
        return {**{k: v for k, v in ckpt.items() if k != "epoch"}, "epochs_done": ckpt["epoch"]}
    monkeypatch.setattr(checkpoint, "CHECKPOINT_VERSION", 3)
    monkeypatch.setattr(checkpoint, "MIGRATIONS", {2: rename_epoch})
    ckpt = checkpoint.load_checkpoint(BEST)
    assert ckpt["version"] == 3 and ckpt["epochs_done"] == 1 and "epoch" not in ckpt
    assert checkpoint.checkpoint_fields(BEST, ("epochs_done", "arch")) == \
        {"epochs_done": 1, "arch": "Unet"}


def test_a_version_newer_than_the_code_is_refused_with_its_number(tmp_path):
    newer = tmp_path / "newer.pth"
    torch.save({**torch.load(BEST, weights_only=True), "version": 3}, newer)
    with pytest.raises(CheckpointError, match=r"version 3, newer than this code reads \(up to "
                                              r"2\): update the project"):
        checkpoint.load_checkpoint(newer)
    assert checkpoint.checkpoint_fields(newer, ("epoch",)) == {}
    older = tmp_path / "older.pth"
    torch.save({**torch.load(BEST, weights_only=True), "version": 1}, older)
    with pytest.raises(CheckpointError, match="version 1, from before"):
        checkpoint.load_checkpoint(older)


# ----------------------------------------------------------------------------- a new setting

ADAM_EPS_ROW = settings.Setting("ADAM_EPS", "the optimiser's epsilon", settings.FIXED,
                                older=1e-8)


@pytest.fixture
def adam_eps(monkeypatch):
    """A setting added after the fixture was written, in its three places: the constant, the
    row (records before it trained with torch's default epsilon: older=1e-8) and its use (the
    optimiser's epsilon, and the record inference reads through checkpoint.setting)."""
    monkeypatch.setattr(train_model, "ADAM_EPS", 1e-6, raising=False)
    monkeypatch.setattr(train_model, "SETTINGS", train_model.SETTINGS + [ADAM_EPS_ROW])
    start = train_model.start_training

    def use(args, *rest):
        made = start(args, *rest)  # (model, optimizer, ...)
        for group in made[1].param_groups:
            group["eps"] = args.adam_eps
        return made
    monkeypatch.setattr(train_model, "start_training", use)
    # what `train_model.py --print-settings` prints once the row is in the file
    monkeypatch.setattr(checkpoint, "_TRAINING_OLDER",
                        [settings.older_values(train_model.SETTINGS)])
    monkeypatch.setattr(checkpoint, "NOTED", set())


def test_an_older_record_resumes_and_evaluates_with_the_older_value(v2, adam_eps, capsys):
    model_dir = v2 / "model"
    assert train_model.main(["--resume", "--model-dir", str(model_dir), "--data",
                             str(v2 / "data"), "--epochs", "2", *MACHINE]) == 0
    out = capsys.readouterr().out
    assert out.count("recorded before the setting adam_eps existed: read as "
                     "adam_eps=1e-08") == 1
    state = checkpoint.load_checkpoint(model_dir / LAST.name)
    assert state["settings"]["adam_eps"] == 1e-8  # the run's record no longer misstates it
    assert {g["eps"] for g in state["optimizer_state"]["param_groups"]} == {1e-8}
    old = checkpoint.load_checkpoint(BEST)  # inference: the older record, read as it was
    assert checkpoint.setting(old, "adam_eps", BEST) == 1e-8
    assert "adam_eps" not in old["settings"]
    assert test_model.main(["--checkpoint", str(BEST), "--evaluate", "--split", "valid",
                            "--data", str(v2 / "data"), "--out", str(v2 / "eval"),
                            "--workers", "0", "--device", "cpu"]) == 0


def test_a_new_record_stores_the_new_value_and_resume_refuses_another(v2, adam_eps, capsys):
    run = ["--data", str(v2 / "data"), "--model-dir", str(v2 / "new"), "--arch", "Unet",
           "--encoder", "tu-test_resnet", "--encoder-weights", "none", "--encoder-depth", "3",
           "--image-size", "32", "32", "--batch-size", "4", "--epochs", "1", *MACHINE]
    assert train_model.main(run) == 0
    state = checkpoint.load_checkpoint(v2 / "new" / LAST.name)
    assert state["settings"]["adam_eps"] == 1e-6
    assert {g["eps"] for g in state["optimizer_state"]["param_groups"]} == {1e-6}
    assert checkpoint.setting(state, "adam_eps") == 1e-6
    with pytest.raises(SystemExit, match="ADAM_EPS=1e-06, not 0.0001"):
        train_model.main(run + ["--resume", "--epochs", "2", "--adam-eps", "1e-4"])
    with pytest.raises(SystemExit, match="ADAM_EPS=1e-08, not 1e-06"):  # the older record
        train_model.main(["--resume", "--model-dir", str(v2 / "model"), "--data",
                          str(v2 / "data"), "--epochs", "2", "--adam-eps", "1e-6", *MACHINE])


def test_print_settings_is_the_table_that_checkpoint_reads_older_values_from():
    described = settings.read_script(train_model.__file__)
    assert described == json.loads(json.dumps(settings.describe(train_model.SETTINGS,
                                                                vars(train_model))))
    assert settings.defaults(described)["IMAGE_SIZE"] == train_model.IMAGE_SIZE


# ----------------------------------------------------------------------------- full disk

def test_a_full_disk_stops_in_one_line_and_keeps_the_last_complete_epoch(v2, monkeypatch,
                                                                         capsys):
    """The resume state of epoch 2 meets a full disk (torch.save's RuntimeError, chained from
    ENOSPC, as torch reports it): one line, exit non-zero, epoch 1 kept and resumable."""
    run = ["--data", str(v2 / "data"), "--model-dir", str(v2 / "full"), "--arch", "Unet",
           "--encoder", "tu-test_resnet", "--encoder-weights", "none", "--encoder-depth", "3",
           "--image-size", "32", "32", "--batch-size", "4", "--epochs", "2", *MACHINE]
    real_save = torch.save

    def save(obj, f):
        if obj.get("epoch") == 2 and "optimizer_state" in obj:
            f.write(b"PK\x03\x04 partial")
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError as exc:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . "
                                   "PytorchStreamWriter failed writing file") from exc
        real_save(obj, f)
    monkeypatch.setattr(checkpoint.torch, "save", save)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                        lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(SystemExit) as stop:
        train_model.main(run)
    message = str(stop.value.code)
    assert "\n" not in message and message.startswith("error: could not save ")
    assert f"in {v2 / 'full'} (No space left on device)" in message
    needed = checkpoint.stored_bytes(torch.load(v2 / "full" / LAST.name, weights_only=True))
    assert f"needs about {needed:,} bytes, 4,096 bytes are free" in message
    assert "--resume continues after epoch 1" in message
    assert not list((v2 / "full").glob("*.tmp"))
    assert checkpoint.load_checkpoint(v2 / "full" / LAST.name)["epoch"] == 1
    assert checkpoint.load_checkpoint(v2 / "full" / BEST.name)["epoch"] in (1, 2)
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    assert train_model.main(run + ["--resume"]) == 0
    assert checkpoint.load_checkpoint(v2 / "full" / LAST.name)["epoch"] == 2
