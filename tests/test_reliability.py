"""Issue 7: bad input, crashes, numerical faults, full disks and untrusted files never cost a
result. Each test plants one fault and checks the known outcome.

Tiny settings throughout (14 generated pairs, 64x64, resnet18 from scratch, 1-2 epochs); the
SIGKILL test runs real `python train_model.py` processes."""
import csv
import errno
import hashlib
import os
import queue
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import demo_data
import model as model_lib
import load_dataset
import preprocess
import train_model
import checkpoint as ckpt_lib
import engine
import settings as settings_lib
from conftest import record_of  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TINY = ["--encoder", "resnet18", "--encoder-weights", "none", "--image-size", "64", "64",
        "--batch-size", "4", "--workers", "0", "--device", "cpu", "--quiet"]
IMAGES = "ISIC2018_Task1-2_Training_Input"
MASKS = "ISIC2018_Task1_Training_GroundTruth"
REAL_MAKE_LOSS = model_lib.make_loss
SETTINGS = {"encoder": "resnet18", "encoder_depth": 5, "image_size": (64, 64), "threshold": 0.5,
            "demo": False, "data": "d", "split_file": "s"}


# ----------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, two threads that wait on each other
    make a tiny training step tens of times slower. Restored after this module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def demo_tree(tmp_path_factory):
    """14 generated pairs: 1 test, 1 valid, 12 train (3 full batches of 4, none dropped)."""
    root = tmp_path_factory.mktemp("demo")
    demo_data.make_demo(root, count=14, seed=5)
    return root


@pytest.fixture(scope="module")
def trained(demo_tree, tmp_path_factory):
    """Data and Model folders after one finished epoch: a best model and a resume state."""
    base = tmp_path_factory.mktemp("trained")
    data, model_dir = base / "data", base / "Model"
    shutil.copytree(demo_tree, data)
    assert train(data, model_dir, "--epochs", "1") == 0
    return data, model_dir


def fresh(demo_tree, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_tree, data)
    return data


def fresh_trained(trained, tmp_path):
    """A private copy of the one-epoch run (data with its split file, and the Model folder)."""
    data, model_dir = tmp_path / "data", tmp_path / "Model"
    shutil.copytree(trained[0], data)
    shutil.copytree(trained[1], model_dir)
    return data, model_dir


def train(data, model_dir, *extra):
    return train_model.main(["--data", str(data), "--model-dir", str(model_dir), *TINY, *extra])


def stopped(data, model_dir, *extra):
    """The one-line message a refused or stopped run exits with."""
    with pytest.raises(SystemExit) as stop:
        train(data, model_dir, *extra)
    message = str(stop.value.code)
    assert "\n" not in message.strip(), message
    return message


def read_log(model_dir):
    with open(model_dir / "fpn_resnet18_log.csv") as f:
        return list(csv.DictReader(f))


def fingerprint(path):
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def loads_as_model(path):
    """The checkpoint loads with weights_only=True and rebuilds a working model."""
    ckpt = ckpt_lib.load_checkpoint(path)
    model = ckpt_lib.model_from_checkpoint(ckpt, path).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 64, 64)
    return ckpt


def bomb_png(width=50_000, height=50_000):
    """A 100-byte PNG whose header declares width x height pixels (a decompression bomb)."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    rows = zlib.compress(b"\x00" * (width + 1) * 2)  # the first two rows; the rest is implied
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows)
            + chunk(b"IEND", b""))


def saved_record(encoder="resnet18", depth=5, **settings):
    torch.manual_seed(0)
    model = model_lib.build_model(encoder, None, depth)
    return record_of(model, {**SETTINGS, "encoder": encoder, "encoder_depth": depth, **settings})


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "fpn_resnet18.pth"
    ckpt_lib.save_checkpoint(saved_record(), path)
    return path


# ----------------------------------------------------------------------------- 1. bad files

def truncate(path):
    """Cut a JPEG to 2/5 of its bytes: the header still reads, the pixel data ends early."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 5])


def plant_bad_files(data):
    """Break files of the demo tree; {file name: (what the run must call it, reason words)}."""
    images, masks = data / IMAGES, data / MASKS
    truncate(images / "ISIC_9000001.jpg")
    (images / "ISIC_9000002.jpg").write_bytes(b"")
    (images / "ISIC_9000003.jpg").write_text("id,diagnosis\nISIC_9000003,nevus\n")
    shutil.copy(masks / "ISIC_9000000_segmentation.png", masks / "ISIC_9000099_segmentation.png")
    def rewrite_mask(pair_id, change):
        path = masks / f"{pair_id}_segmentation.png"
        cv2.imwrite(str(path), change(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)))

    def resized(mask, fx, fy):
        return cv2.resize(mask, None, fx=fx, fy=fy, interpolation=cv2.INTER_NEAREST)
    rewrite_mask("ISIC_9000004", lambda m: cv2.merge([m] * 3))  # RGB
    rewrite_mask("ISIC_9000005", lambda m: (m > 0).astype(np.uint8))  # 0/1
    rewrite_mask("ISIC_9000006", lambda m: resized(m, 0.5, 1.0))  # another aspect ratio
    rewrite_mask("ISIC_9000007", lambda m: resized(m, 0.5, 0.5))  # half size, same aspect
    (images / "ISIC_9000008.jpg").unlink()
    (images / "ISIC_9000008.png").write_bytes(bomb_png())
    return {
        "ISIC_9000001.jpg": ("skipped", "truncated"),
        "ISIC_9000002.jpg": ("skipped", "zero-byte"),
        "ISIC_9000003.jpg": ("skipped", "text file"),
        "ISIC_9000099_segmentation.png": ("skipped", "mask without image"),
        "ISIC_9000004_segmentation.png": ("corrected", "RGB mask reduced to one channel"),
        "ISIC_9000005_segmentation.png": ("corrected", "0/1 mask"),
        "ISIC_9000006_segmentation.png": ("skipped", "aspect ratio"),
        "ISIC_9000007_segmentation.png": ("corrected", "resized"),
        "ISIC_9000008.png": ("skipped", "decompression bomb"),
    }


def test_bad_files_in_a_real_run_are_named_and_training_finishes(demo_tree, tmp_path, capsys):
    data, out = fresh(demo_tree, tmp_path), tmp_path / "Model"
    planted = plant_bad_files(data)
    assert train(data, out, "--epochs", "1") == 0
    console = capsys.readouterr().out
    assert [r["epoch"] for r in read_log(out)] == ["1"]  # training ran to its end
    report = (out / "fpn_resnet18_data.txt").read_text()
    for name, (kind, words) in planted.items():
        lines = [line for line in console.splitlines() if name in line]
        assert any(line.strip().startswith(kind) and words in line for line in lines), \
            (name, lines)
        assert name in report
    # the pairs of the unusable images are named too, and the closing summary points to the list
    assert "skipped ISIC2018_Task1_Training_GroundTruth/ISIC_9000001_segmentation.png" in console
    assert f"(listed in {out / 'fpn_resnet18_data.txt'})" in console.splitlines()[-1]
    # 14 pairs less the 5 unusable ones
    assert ": 1 test, 1 valid, 7 train; 3 corrected, 11 skipped" in console.splitlines()[0]


def _split_and_then(monkeypatch, act):
    """Run `act(splits)` right after train_model has scanned and split the data."""
    real = load_dataset.split_pairs

    def split_then_act(*args, **kwargs):
        splits = real(*args, **kwargs)
        act(splits)
        return splits
    monkeypatch.setattr(load_dataset, "split_pairs", split_then_act)


def test_image_truncated_during_the_run_is_skipped_with_a_warning(demo_tree, tmp_path, capsys,
                                                                   monkeypatch, recwarn):
    data, out = fresh(demo_tree, tmp_path), tmp_path / "Model"
    victim = []
    _split_and_then(monkeypatch, lambda splits: victim.append(splits["train"][0].image))
    real_plot = train_model.plot_curves

    def plot_then_truncate(*args, **kwargs):  # after epoch 1, its cache entry already built
        real_plot(*args, **kwargs)
        if len(victim) == 1:
            truncate(victim[0])
            victim.append("done")
    monkeypatch.setattr(train_model, "plot_curves", plot_then_truncate)

    assert train(data, out, "--epochs", "2") == 0
    console = capsys.readouterr().out
    assert [r["epoch"] for r in read_log(out)] == ["1", "2"]
    assert "warning: epoch 1" not in console
    assert "warning: epoch 2: 1 training and 0 validation image(s) could not be read" in console
    assert "1 image read(s) failed during training" in console.splitlines()[-1]
    named = [str(w.message) for w in recwarn if victim[0].name in str(w.message)]
    assert named and "truncated" in named[0], [str(w.message) for w in recwarn]


def test_image_deleted_after_the_scan_is_skipped_by_a_loader_worker(demo_tree, tmp_path, capsys,
                                                                     monkeypatch):
    data, out = fresh(demo_tree, tmp_path), tmp_path / "Model"
    _split_and_then(monkeypatch, lambda splits: splits["train"][0].image.unlink())
    assert train(data, out, "--epochs", "1", "--workers", "1") == 0
    console = capsys.readouterr().out
    assert [r["epoch"] for r in read_log(out)] == ["1"]
    assert "warning: epoch 1: 1 training and 0 validation image(s) could not be read" in console


def _print_warnings_to_stderr(worker_id):
    """In the worker: show warnings on fd 2 (pytest records them only in its own process)."""
    warnings.simplefilter("always")
    warnings.showwarning = lambda message, *args, **kwargs: os.write(2, f"{message}\n".encode())


def test_loader_worker_warns_by_name_and_keeps_the_readable_items(demo_tree, tmp_path, capfd):
    data = fresh(demo_tree, tmp_path)
    pairs = load_dataset.scan(data).splits["train"][:3]
    truncate(pairs[1].image)  # after the scan
    dataset = load_dataset.SegmentationDataset(pairs, (64, 64))
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=1,
                                         collate_fn=load_dataset.collate_skip_none,
                                         worker_init_fn=_print_warnings_to_stderr)
    images, masks, ids = next(iter(loader))
    assert list(ids) == [pairs[0].id, pairs[2].id] and images.shape == (2, 3, 64, 64)
    err = capfd.readouterr().err
    assert f"skipping {pairs[1].image}" in err and "truncated" in err


# ----------------------------------------------------------------------------- 2. crashes

class Process:
    """`python train_model.py ...` with its stdout read line by line on a thread."""

    def __init__(self, tmp_path, data, model_dir, *extra):
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")  # a core for polling
        self.err_path = tmp_path / f"stderr_{time.monotonic_ns()}.txt"
        with open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(REPO / "train_model.py"), "--data", str(data),
                 "--model-dir", str(model_dir), *TINY, "--epochs", "3", *extra],
                cwd=tmp_path, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        self.lines, self._queue = [], queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_line(self, pattern, timeout=240):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            if re.search(pattern, line):
                return line
        self.proc.kill()
        raise AssertionError(f"no line matching {pattern!r}; output:\n" + "\n".join(self.lines)
                             + "\nstderr:\n" + self.err_path.read_text())

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=60) == -signal.SIGKILL

    def finish(self, timeout=300):
        rc = self.proc.wait(timeout=timeout)
        while (line := self._queue.get(timeout=10)) is not None:
            self.lines.append(line)
        return rc


def epoch_row(epoch):
    return rf"^\s+{epoch}\s+\d"


def _size(path):
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return -1


def kill_during_a_write(tmp_path, data, out, targets):
    """Resume the run and SIGKILL it while one of `targets` (temporary checkpoint files) exists.

    The poll sees the file within microseconds of its creation and a write lasts tens of
    milliseconds (52 MB for the best model, 157 MB for the resume state, each fsynced); should
    a busy machine still let the write finish before the kill, resume and try again."""
    last = out / "fpn_resnet18_last.pth"
    for attempt in range(3):
        for t in (out / "fpn_resnet18.pth.tmp", out / "fpn_resnet18_last.pth.tmp"):
            t.unlink(missing_ok=True)  # a kill's leftover is harmless; the poll needs a new one
        resumed_from = ckpt_lib.load_checkpoint(last)["epoch"]
        run = Process(tmp_path, data, out, "--resume")
        run.wait_line(rf"resuming after epoch {resumed_from} ")
        deadline, writing = time.monotonic() + 240, None
        while writing is None and time.monotonic() < deadline and run.proc.poll() is None:
            writing = next((t for t in targets if _size(t) > 0), None)  # data half written
        assert writing, f"the run ended before a write of {targets} was seen"
        run.kill()
        if os.path.exists(writing):  # killed inside the write: the half file is still there
            print(f"killed while writing {Path(writing).name} ({os.path.getsize(writing)} "
                  f"bytes so far), attempt {attempt + 1}")
            return resumed_from
    pytest.fail("three kills in a row landed after the write they aimed at")


def check_after_kill(out, resumed_from):
    """The best model loads; the resume state is the last complete epoch or the one before."""
    saved = ckpt_lib.load_checkpoint(out / "fpn_resnet18_last.pth")
    assert saved["epoch"] in (resumed_from, resumed_from + 1)
    rows = read_log(out)
    assert len(rows) == saved["epoch"]  # the log is written after the resume state
    ious = [float(r["valid_iou"]) for r in rows]
    best = loads_as_model(out / "fpn_resnet18.pth")
    # the best model may be one epoch ahead of the resume state (killed between the two writes)
    assert best["epoch"] <= saved["epoch"] + 1 and best["valid_iou"] >= max(ious) - 1e-6
    return saved["epoch"]


def test_sigkill_between_epochs_and_mid_checkpoint_then_resume_completes(demo_tree, tmp_path):
    data, out = fresh(demo_tree, tmp_path), tmp_path / "Model"
    best, last = out / "fpn_resnet18.pth", out / "fpn_resnet18_last.pth"
    best_tmp, last_tmp = str(best) + ".tmp", str(last) + ".tmp"

    # with no saved state, --resume starts from the beginning and says so; killed after epoch 1
    run = Process(tmp_path, data, out, "--resume")
    run.wait_line(r"no saved state at .*fpn_resnet18_last\.pth: starting from the beginning")
    run.wait_line(epoch_row(1))
    run.kill()
    assert loads_as_model(best)["epoch"] == 1
    assert ckpt_lib.load_checkpoint(last)["epoch"] == 1
    assert len(read_log(out)) == 1

    # killed in the middle of a checkpoint write: the first seen (in practice the best model's),
    # then the resume state's, which is written after the best model's
    check_after_kill(out, kill_during_a_write(tmp_path, data, out, [best_tmp, last_tmp]))
    saved_epoch = check_after_kill(out, kill_during_a_write(tmp_path, data, out, [last_tmp]))

    # --resume finishes the run with the same epoch count and schedule
    run = Process(tmp_path, data, out, "--resume")
    assert run.finish() == 0, (run.lines, run.err_path.read_text())
    assert any(f"resuming after epoch {saved_epoch} " in line for line in run.lines)
    rows = read_log(out)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert {float(r["lr"]) for r in rows} == {1e-4}
    assert ckpt_lib.load_checkpoint(last)["epoch"] == 3
    ious = [float(r["valid_iou"]) for r in rows]
    assert loads_as_model(best)["valid_iou"] == pytest.approx(max(ious), abs=1e-6)


def test_ctrl_c_keeps_the_resume_state_and_exits_with_one_line(trained, tmp_path, capsys,
                                                               monkeypatch, request):
    data, out = fresh_trained(trained, tmp_path)
    before = fingerprint(out / "fpn_resnet18_last.pth")
    real = engine.train_one_epoch
    # Python's own Ctrl-C handler, also where the suite was started in the background with
    # SIGINT ignored (a shell's `&` does that): then the signal below would be dropped
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))

    def ctrl_c_then_train(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # a real SIGINT, handled by Python as Ctrl-C
        return real(*args, **kwargs)
    monkeypatch.setattr(train_model, "train_one_epoch", ctrl_c_then_train)
    with pytest.raises(SystemExit) as stop:
        train(data, out, "--epochs", "2", "--resume")
    assert stop.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"interrupted: in epoch 2; the resume state {out / 'fpn_resnet18_last.pth'} "
                       f"holds epoch 1: continue with --resume --model-dir {out}")
    assert fingerprint(out / "fpn_resnet18_last.pth") == before
    assert not list(out.glob("*.tmp"))


def test_ctrl_c_in_the_first_epoch_says_nothing_was_saved(demo_tree, tmp_path, capsys,
                                                          monkeypatch):
    data, out = fresh(demo_tree, tmp_path), tmp_path / "Model"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train_model, "train_one_epoch", interrupted)
    with pytest.raises(SystemExit) as stop:
        train(data, out, "--epochs", "2")
    assert stop.value.code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "interrupted: in epoch 1, before any epoch finished: nothing was saved"


def test_ctrl_c_during_a_checkpoint_write_leaves_no_half_file(good_checkpoint, tmp_path,
                                                              monkeypatch):
    path = tmp_path / "fpn_resnet18.pth"
    shutil.copy(good_checkpoint, path)
    before = fingerprint(path)

    def interrupted_save(obj, f):
        f.write(b"PK\x03\x04" + b"\x00" * 4096)
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt_lib.save_checkpoint({"x": 1}, path)
    assert fingerprint(path) == before and not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("flags, changes, constant", [
    (["--image-size", "96", "96"], {}, "IMAGE_SIZE=(64, 64), not (96, 96)"),
    (["--encoder-depth", "4"], {}, "ENCODER_DEPTH=5, not 4"),
    ([], {"encoder": "resnet34"}, "ENCODER='resnet34', not 'resnet18'"),
    # the recipe: a resume under another one would not end as the straight run does
    (["--lr", "3e-4"], {}, "LR=0.0001, not 0.0003"),
    (["--lr-drop-epoch", "1"], {}, "LR_DROP_EPOCH=25, not 1"),
    (["--batch-size", "2"], {}, "BATCH_SIZE=4, not 2"),
    (["--loss", "dice+bce"], {}, "LOSS='dice', not 'dice+bce'"),
    (["--augment", "flips"], {}, "AUGMENT='full', not 'flips'"),
    (["--seed", "7"], {}, "SEED=42, not 7"),
    (["--mean", "0.5", "0.5", "0.5"], {}, "MEAN=(0.485, 0.456, 0.406), not (0.5, 0.5, 0.5)"),
    (["--folds", "1"], {"folds": 2}, "FOLDS=2, not 1"),  # fold 0 of 2 in the place of this run
    (["--threshold", "0.3"], {}, "THRESHOLD=0.5, not 0.3"),  # the best epoch's measure
])
def test_resume_refuses_a_state_made_with_other_settings(trained, tmp_path, flags, changes,
                                                         constant):
    data, out = fresh_trained(trained, tmp_path)
    last = out / "fpn_resnet18_last.pth"
    if changes:  # a state file of another run put in this one's place
        state = torch.load(last, weights_only=True)
        state["settings"].update(changes)
        torch.save(state, last)
    before = fingerprint(last)
    message = stopped(data, out, "--epochs", "2", "--resume", *flags)  # before the data scan
    assert message.startswith(f"error: --resume: {last} was made with {constant}")
    assert fingerprint(last) == before and len(read_log(out)) == 1


def test_both_checkpoints_record_the_settings_and_a_resume_keeps_them(trained, tmp_path,
                                                                      capsys):
    data, out = fresh_trained(trained, tmp_path)
    best, last = out / "fpn_resnet18.pth", out / "fpn_resnet18_last.pth"
    expected = {"arch": "FPN", "seed": 42, "folds": 1, "batch_size": 4, "lr": 1e-4,
                "lr_drop_epoch": 25, "lr_after_drop": 1e-5, "loss": "dice", "augment": "full",
                "epochs": 1}
    assert expected.items() <= ckpt_lib.load_checkpoint(best)["settings"].items()
    state = torch.load(last, weights_only=True)
    assert expected.items() <= state["settings"].items() and state["processes"] == 1
    assert not {"workers", "device", "cache", "model_dir"} & set(state["settings"])  # machine's
    state["processes"] = 2  # as a run under torchrun with 2 processes saved it
    torch.save(state, last)
    message = stopped(data, out, "--epochs", "2", "--resume", "--seed", "7")
    assert message.startswith(f"error: --resume: {last} was made with SEED=42, not 7")
    # only the model folder and the longer run: the recipe comes from the state
    assert train_model.main(["--model-dir", str(out), "--resume", "--epochs", "2", "--workers",
                             "0", "--quiet"]) == 0
    assert ("note: the state was saved by a run of 2 process(es), this one has 1: each "
            "process's share of an epoch changes, so the run will not end exactly as a straight "
            "one would") in capsys.readouterr().out.splitlines()
    assert [float(r["lr"]) for r in read_log(out)] == [1e-4, 1e-4]
    resumed = ckpt_lib.load_checkpoint(last)["settings"]
    assert {**expected, "epochs": 2}.items() <= resumed.items()


# ----------------------------------------------------------------------------- 3. NaN / inf

def _loss_turning(value, at_call):
    """A Dice loss whose `at_call`-th training step (counting across epochs) returns `value`."""
    real, calls = REAL_MAKE_LOSS(), []

    def loss(logits, masks):
        result = real(logits, masks)
        if torch.is_grad_enabled():  # training; evaluate runs under inference_mode
            calls.append(1)
            if len(calls) == at_call:
                return result * float(value)
        return result
    return loss


def test_nan_loss_stops_naming_epoch_and_step_and_best_is_untouched(trained, tmp_path, monkeypatch):
    data, out = fresh_trained(trained, tmp_path)
    best, last = out / "fpn_resnet18.pth", out / "fpn_resnet18_last.pth"
    before = fingerprint(best), fingerprint(last)
    monkeypatch.setattr(model_lib, "make_loss", lambda *_: _loss_turning("nan", at_call=2))
    message = stopped(data, out, "--epochs", "2", "--resume")
    assert "loss became nan at epoch 2, step 2" in message
    assert "the best checkpoint is untouched" in message
    assert (fingerprint(best), fingerprint(last)) == before
    assert loads_as_model(best)["epoch"] == 1


def test_inf_loss_at_the_first_step_stops_before_anything_is_saved(demo_tree, tmp_path,
                                                                   monkeypatch):
    data, out = fresh(demo_tree, tmp_path), tmp_path / "Model"
    monkeypatch.setattr(model_lib, "make_loss", lambda *_: _loss_turning("inf", at_call=1))
    message = stopped(data, out, "--epochs", "2")
    assert "loss became inf at epoch 1, step 1" in message
    assert not list(out.glob("*.pth*"))


def test_nan_validation_is_never_the_best_and_a_nan_model_stops_the_run(trained, tmp_path,
                                                                        monkeypatch):
    data, out = fresh_trained(trained, tmp_path)
    best, last = out / "fpn_resnet18.pth", out / "fpn_resnet18_last.pth"
    before = fingerprint(best)
    real, epochs = engine.validate, []

    def planted_evaluate(*args, **kwargs):
        result = real(*args, **kwargs)
        epochs.append(1)
        if len(epochs) == 1:  # epoch 2: no validation image readable, so IoU is NaN
            result.update(iou=float("nan"), dice=float("nan"), images=0)
        else:  # epoch 3: the model gives NaN
            result.update(loss=float("nan"), iou=float("nan"))
        return result
    monkeypatch.setattr(train_model, "validate", planted_evaluate)
    message = stopped(data, out, "--epochs", "3", "--resume")
    assert "validation loss became nan" in message and "at epoch 3" in message
    assert fingerprint(best) == before and loads_as_model(best)["epoch"] == 1
    assert ckpt_lib.load_checkpoint(last)["epoch"] == 2  # epoch 3 saved nothing
    rows = read_log(out)
    assert [r["epoch"] for r in rows] == ["1", "2"] and rows[1]["valid_iou"] == "nan"


def test_nan_weights_are_caught_before_saving():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    valid = {"images": 3, "loss": 0.4, "iou": 0.5}
    train_model.check_epoch_finite(valid, model, 4)  # a healthy model passes
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    with pytest.raises(engine.NonFiniteLoss, match="at epoch 4"):
        train_model.check_epoch_finite(valid, model, 4)


# ----------------------------------------------------------------------------- 4. resources

@pytest.mark.parametrize("how", ["below a file", "write refused"])
def test_unwritable_output_folder_is_refused_before_training(demo_tree, tmp_path, capsys,
                                                             monkeypatch, how):
    data = fresh(demo_tree, tmp_path)
    if how == "below a file":
        (tmp_path / "taken").write_text("a file, not a folder")
        out = tmp_path / "taken" / "Model"
    else:  # as a read-only folder behaves for a user who is not root
        out = tmp_path / "Model"
        out.mkdir()

        def refuse(self, *args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        monkeypatch.setattr(Path, "write_bytes", refuse)
    message = stopped(data, out, "--epochs", "1")
    assert message.startswith(f"error: MODEL_DIR={str(out)!r} cannot be written")
    assert "data:" not in capsys.readouterr().out  # before the data was even scanned


def test_full_disk_at_a_checkpoint_write_names_the_path_and_keeps_the_old_file(trained, tmp_path,
                                                                               monkeypatch):
    data, out = fresh_trained(trained, tmp_path)
    best, last = out / "fpn_resnet18.pth", out / "fpn_resnet18_last.pth"
    before = fingerprint(best), fingerprint(last)

    def disk_fills(obj, f):
        f.write(b"PK\x03\x04" + b"\x00" * 65536)  # part of the file reached the disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", disk_fills)
    message = stopped(data, out, "--epochs", "2", "--resume")
    assert re.fullmatch(rf"error: could not save (fpn_resnet18(_last)?\.pth) in {out} \(No space "
                        rf"left on device\): it needs about [\d,]+ bytes, [\d,]+ bytes are free "
                        rf"there; the previous \1 is unchanged\. Stopped at epoch 2: free some "
                        rf"space, then --resume continues after epoch 1", message)
    assert (fingerprint(best), fingerprint(last)) == before
    assert not list(out.glob("*.tmp"))


def test_full_disk_at_the_rename_keeps_the_old_file(good_checkpoint, tmp_path, monkeypatch):
    path = tmp_path / "fpn_resnet18.pth"
    shutil.copy(good_checkpoint, path)
    before = fingerprint(path)

    def no_space(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(OSError, match=f"could not save {path.name} in {path.parent} \\(No space "
                                      f"left on device\\): it needs about"):
        ckpt_lib.save_checkpoint(saved_record(), path)
    assert fingerprint(path) == before and not list(tmp_path.glob("*.tmp"))


def test_low_free_disk_space_is_warned_in_one_line(tmp_path, capsys, monkeypatch):
    model = torch.nn.Linear(1024, 1024)  # 4 MB of weights
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=10 * 2**20))
    train_model.warn_if_disk_low(tmp_path, model)
    assert capsys.readouterr().out.splitlines() == [
        f"warning: only 10 MB free for {tmp_path}; the checkpoints need about 28 MB: free some "
        f"space or pass another --model-dir"]
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=2**30))
    train_model.warn_if_disk_low(tmp_path, model)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),  # cuDNN's way of saying the same
])
def test_gpu_out_of_memory_names_the_constants_to_lower(demo_tree, tmp_path, monkeypatch, error):
    data, out = fresh(demo_tree, tmp_path), tmp_path / "Model"
    real = model_lib.build_model

    def build_model_that_runs_out(*args, **kwargs):
        model = real(*args, **kwargs)

        def forward(*_):
            raise error
        model.forward = forward
        return model
    monkeypatch.setattr(model_lib, "build_model", build_model_that_runs_out)
    message = stopped(data, out, "--epochs", "1", "--batch-size", "4")
    assert "out of memory at BATCH_SIZE=4, IMAGE_SIZE=(64, 64)" in message
    assert "lower BATCH_SIZE (--batch-size) or IMAGE_SIZE (--image-size)" in message


def test_other_runtime_errors_are_not_called_out_of_memory(demo_tree, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    monkeypatch.setattr(train_model, "train_one_epoch", broken)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        train(fresh(demo_tree, tmp_path), tmp_path / "Model", "--epochs", "1")


# ----------------------------------------------------------------------------- 5. untrusted files

class Planted:
    """Unpickling this runs code: it writes the file named in `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def test_pickled_code_in_a_checkpoint_is_refused_without_running(good_checkpoint, tmp_path):
    marker, path = tmp_path / "ran.txt", tmp_path / "evil.pth"
    record = torch.load(good_checkpoint, weights_only=True)
    record["extra"] = Planted(marker)
    torch.save(record, path)
    with pytest.raises(ckpt_lib.CheckpointError, match="pickled Python objects"):
        ckpt_lib.load_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the plant is real: a plain load runs its code
    assert marker.read_text() == "code ran"


def test_files_of_other_programs_and_truncated_checkpoints_are_refused(good_checkpoint,
                                                                      tmp_path):
    data = good_checkpoint.read_bytes()
    files = {  # file name: (bytes, what the message must say)
        "settings.pth": (b'{"format": "melanoma-fpn-checkpoint", "epoch": 3}', "it is JSON text"),
        "picture.pth": (cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1].tobytes(),
                        "it is a PNG image"),
        "empty.pth": (b"", "it is empty"),
        "truncated.pth": (data[: len(data) // 2], "truncated or damaged: PytorchStreamReader"),
        # a bare pickle (what torch < 1.6 wrote): not torch.save's zip archive
        "garbled.pth": (b"\x80\x02" + bytes(range(40, 120)), "not a file written by torch.save"),
    }
    for name, (content, expected) in files.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ckpt_lib.CheckpointError) as refused:
            ckpt_lib.load_checkpoint(path)
        message = str(refused.value)
        assert message.startswith(f"{path} is not a readable checkpoint") and expected in message
        assert "\n" not in message and "weights_only" not in message


def test_whole_model_pickle_and_foreign_dicts_are_refused(tmp_path):
    torch.manual_seed(0)
    model = model_lib.build_model("resnet18", None, 5)
    whole = tmp_path / "whole.pth"
    torch.save(model, whole)  # what the paper's code did
    with pytest.raises(ckpt_lib.CheckpointError, match="torch.save\\(model\\)"):
        ckpt_lib.load_checkpoint(whole)
    foreign = tmp_path / "foreign.pth"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, foreign)  # another trainer's
    with pytest.raises(ckpt_lib.CheckpointError, match="not written by train_model.py"):
        ckpt_lib.load_checkpoint(foreign)
    newer = tmp_path / "newer.pth"
    torch.save({"format": ckpt_lib.CHECKPOINT_FORMAT, "version": 99}, newer)
    with pytest.raises(ckpt_lib.CheckpointError, match="version 99, newer than this code"):
        ckpt_lib.load_checkpoint(newer)
    older = tmp_path / "older.pth"  # a file of version 1, with its settings stored twice
    torch.save({"format": ckpt_lib.CHECKPOINT_FORMAT, "version": 1, "encoder": "resnet18",
                "recipe": {}, "model_state": model.state_dict()}, older)
    with pytest.raises(ckpt_lib.CheckpointError,
                       match=r"version 1, from before the format this code reads \(version 2 "
                             r"on\): train the model again"):
        ckpt_lib.load_checkpoint(older)


def test_checkpoint_for_another_encoder_or_size(good_checkpoint, tmp_path):
    ckpt = ckpt_lib.load_checkpoint(good_checkpoint)
    # weights that do not fit the encoder they are recorded with
    def changed(**settings):
        return {**ckpt, "settings": {**ckpt["settings"], **settings}}
    for encoder in ("resnet34", "no_such_encoder"):
        with pytest.raises(ckpt_lib.CheckpointError,
                           match=f"does not fit its recorded model \\(FPN '{encoder}'\\)"):
            ckpt_lib.model_from_checkpoint(changed(encoder=encoder), "x.pth")
    with pytest.raises(ckpt_lib.CheckpointError, match="does not fit"):
        ckpt_lib.model_from_checkpoint(changed(encoder_depth=4), "x.pth")
    # an FPN's weights are never loaded into another architecture, nor a Unet's into an FPN
    with pytest.raises(ckpt_lib.CheckpointError, match="does not fit its recorded model \\(Unet"):
        ckpt_lib.model_from_checkpoint(changed(arch="Unet"), "x.pth")
    # a true checkpoint of another encoder and size: the recorded settings rebuild its model
    path = tmp_path / "resnet34.pth"
    ckpt_lib.save_checkpoint(saved_record("resnet34", image_size=[96, 128]), path)
    other = ckpt_lib.load_checkpoint(path)
    model = ckpt_lib.model_from_checkpoint(other, path)
    assert other["settings"]["image_size"] == [96, 128]
    assert sum(p.numel() for p in model.encoder.parameters()) > 20_000_000  # resnet34, not 18


def test_decompression_bomb_is_refused_by_its_header(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png())
    assert path.stat().st_size < 200
    for read in (preprocess.image_info, preprocess.read_image, preprocess.read_mask):
        with pytest.raises(preprocess.ImageError, match="declared size 50000x50000 .* refused"):
            read(path)
    result = load_dataset.check_file((str(path), "image"))
    assert "decompression bomb" in result["error"]


# ----------------------------------------------------------------------------- 6. wrong settings

@pytest.mark.parametrize("flags, constant", [
    (["--image-size", "64", "100"], "IMAGE_SIZE"),
    (["--encoder-depth", "4", "--image-size", "72", "72"], "IMAGE_SIZE"),
    (["--encoder-depth", "6"], "ENCODER_DEPTH"),
    (["--encoder", "tu-no_such_net"], "ENCODER"),
    (["--threshold", "-0.2"], "THRESHOLD"),
    (["--threshold", "nan"], "THRESHOLD"),
    (["--batch-size", "0"], "BATCH_SIZE"),
    (["--epochs", "0"], "EPOCHS"),
    (["--lr", "0"], "LR"),
    (["--lr-after-drop=-1e-5"], "LR_AFTER_DROP"),
    (["--workers", "-1"], "WORKERS"),
])
def test_wrong_setting_is_refused_at_start_up_naming_the_constant(tmp_path, flags, constant):
    message = stopped(tmp_path / "no_data", tmp_path / "Model", "--epochs", "1", *flags)
    assert re.match(rf"error: {constant}[= ]", message), message
    assert not (tmp_path / "Model").exists()  # refused before anything was made


def test_batch_size_one_more_than_the_training_split_is_refused(demo_tree, tmp_path):
    data = fresh(demo_tree, tmp_path)
    message = stopped(data, tmp_path / "Model", "--epochs", "1", "--batch-size", "13")
    assert message == "error: BATCH_SIZE=13 is larger than the training split (12 images)"


def test_drop_epoch_at_the_last_epoch_is_noted_and_the_run_goes_on(demo_tree, tmp_path, capsys):
    data, out = fresh(demo_tree, tmp_path), tmp_path / "Model"
    assert train(data, out, "--epochs", "1", "--lr", "1e-3", "--lr-drop-epoch", "1") == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if "LR_DROP_EPOCH" in line]
    assert notes == ["note: LR_DROP_EPOCH=1 is not before the last epoch (1): the learning rate "
                     "stays 0.001"]
    assert [float(r["lr"]) for r in read_log(out)] == [1e-3]


# ----------------------------------------------------------------------------- 7. weights offline

def encoder_state(encoder, seed):
    torch.manual_seed(seed)
    return model_lib.build_model(encoder, None, 5).encoder.state_dict()


@pytest.mark.parametrize("form", ["pth", "encoder. prefix", "classifier head", "safetensors"])
def test_a_local_encoder_weights_file_is_loaded_exactly(tmp_path, form):
    source = encoder_state("resnet18", seed=3)
    state = dict(source)
    if form == "encoder. prefix":
        state = {f"encoder.{k}": v for k, v in state.items()}
    if form == "classifier head":  # as torchvision's ImageNet file has it
        state.update({"fc.weight": torch.ones(1000, 512), "fc.bias": torch.ones(1000)})
    path = tmp_path / ("weights.safetensors" if form == "safetensors" else "weights.pth")
    if form == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    torch.manual_seed(4)  # another start: only the file can make the weights equal
    loaded = model_lib.build_model("resnet18", str(path), 5).encoder.state_dict()
    assert loaded.keys() == source.keys()
    assert all(torch.equal(loaded[k], source[k]) for k in source)
    assert not torch.equal(encoder_state("resnet18", seed=4)["conv1.weight"],
                           source["conv1.weight"])


def test_an_efficientnet_file_with_its_own_head_is_loaded(tmp_path):
    source = encoder_state("efficientnet-b0", seed=3)
    torch.save({**source, "_fc.weight": torch.ones(1000, 1280), "_fc.bias": torch.ones(1000)},
               tmp_path / "b0.pth")
    torch.manual_seed(4)
    loaded = model_lib.build_model("efficientnet-b0", str(tmp_path / "b0.pth"), 5)
    assert all(torch.equal(v, source[k]) for k, v in loaded.encoder.state_dict().items())


def test_a_weights_file_of_another_encoder_is_refused_with_its_counts(tmp_path):
    own, other = encoder_state("resnet18", 0), encoder_state("resnet34", 0)
    path = tmp_path / "resnet34.pth"
    torch.save(other, path)
    extra = [k for k in other if k not in own]
    with pytest.raises(settings_lib.SettingError) as refused:
        model_lib.build_model("resnet18", str(path), 5)
    assert str(refused.value) == (f"ENCODER_WEIGHTS: {path} does not fit the resnet18 encoder: "
                                  f"0 weights missing, {len(extra)} unexpected (e.g. "
                                  f"{extra[0]!r})")
    half = dict(list(own.items())[:60])
    torch.save(half, path)
    missing = [k for k in own if k not in half and not k.endswith("num_batches_tracked")]
    with pytest.raises(settings_lib.SettingError, match=rf"{len(missing)} weights missing, 0 "):
        model_lib.build_model("resnet18", str(path), 5)
    torch.save({**own, "conv1.weight": torch.zeros(64, 1, 7, 7)}, path)  # a grey-image model
    with pytest.raises(settings_lib.SettingError) as refused:
        model_lib.build_model("resnet18", str(path), 5)
    assert str(refused.value).endswith("1 weights of another shape (e.g. 'conv1.weight': "
                                       "(64, 1, 7, 7), not (64, 3, 7, 7))")


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "hub unreachable"])
def test_uncached_imagenet_weights_stop_the_run_before_the_data_scan(demo_tree, tmp_path,
                                                                     monkeypatch, offline):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    if offline.endswith("OFFLINE"):
        monkeypatch.setenv(offline, "1")
        cause = f"{offline} is set and the weights are not cached"
    else:
        monkeypatch.setattr(model_lib, "HUB_HOST", "hub.invalid")  # a name that never resolves
        cause = "hub.invalid cannot be reached"
    scans = []
    monkeypatch.setattr(load_dataset, "scan", lambda *a, **k: scans.append(a))
    data, out = fresh(demo_tree, tmp_path), tmp_path / "Model"
    message = stopped(data, out, "--encoder-weights", "imagenet")
    assert message == (f"error: ENCODER_WEIGHTS='imagenet': the download of the resnet18 "
                       f"weights failed ({cause}). Offline, pass --encoder-weights PATH with a "
                       f"local weights file for this encoder, or --encoder-weights none to "
                       f"train from scratch.")
    assert scans == [] and not (data / "split.json").exists()
