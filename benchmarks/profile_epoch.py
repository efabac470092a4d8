"""Where the time of a training epoch goes: one epoch of a real run under torch.profiler.

    OMP_NUM_THREADS=1 python benchmarks/profile_epoch.py --data D -- --folds 5 --fold 0 \
        --encoder resnet18 --encoder-weights none --image-size 128 128 --epochs 2 --lr 3e-4 \
        --lr-drop-epoch 7 --lr-after-drop 3e-5 --workers 1 --quiet

Everything after `--` goes to `python train_model.py` unchanged (here docs/speed.md's
command, cut to 2 epochs). The script runs in this process as a user runs it (runpy, as
__main__, with those flags), not imported: the profiler must live in the process that trains.
The last epoch (its training and its validation) runs under the profiler, so worker start-up
and the first epoch's one-time costs are left out. The pieces of the step are labelled by
wrapping the modules' functions from outside before the script starts (the model's forward,
the loss, the per-step metrics, the optimiser's step is labelled by torch itself,
engine.train_one_epoch and engine.validate, the checkpoint writes); nothing in the project
changes. Prints the epoch's split into those pieces, each as a share of the training wall
time, then the top operators by self CPU time.
"""
import argparse
import functools
import runpy
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

import checkpoint  # noqa: E402
import engine  # noqa: E402
import metrics  # noqa: E402
import model as model_lib  # noqa: E402
import settings  # noqa: E402

# the epochs of the run profiled unless its flags say otherwise: train_model.py's EPOCHS (read
# with `train_model.py --print-settings` when needed), or its --demo's (DEMO["epochs"] there)
DEMO_EPOCHS = 8

TOP = 15  # operators listed
# profiler event names of each piece: labels set below, and torch's own for Adam and the loader
PIECES = {"model forward": "model forward",
          "backward (autograd)": "autograd::engine::evaluate_function",
          "loss": "loss",
          "per-step metrics (batch_confusion)": "batch_confusion",
          "optimiser (Adam step + zero_grad)": "Optimizer.",
          "waiting for the loader": "enumerate(DataLoader)"}


def labelled(fn, label):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)
    return wrapper


class Profiled:
    """Labels the pieces in the modules train_model.py calls; profiles the last epoch's
    engine.train_one_epoch and its engine.validate, each under its own profiler (so the
    training pieces are the training step's alone)."""

    def __init__(self, epochs):
        self.epochs, self.profiles, self.walls, self.last = epochs, {}, {}, False

    def install(self):
        """Before train_model.py runs: it takes these functions from the modules when it
        starts (`from engine import train_one_epoch, validate`) or calls them through them."""
        build, make_loss = model_lib.build_model, model_lib.make_loss

        def build_labelled(*args, **kwargs):
            model = build(*args, **kwargs)
            model.forward = labelled(model.forward, "model forward")
            return model
        model_lib.build_model = build_labelled
        model_lib.make_loss = lambda *a, **k: labelled(make_loss(*a, **k), "loss")
        metrics.batch_confusion = labelled(metrics.batch_confusion, "batch_confusion")
        checkpoint.save_checkpoint = labelled(checkpoint.save_checkpoint, "save_checkpoint")
        engine.train_one_epoch = self.timed(engine.train_one_epoch, "train_one_epoch")
        engine.validate = self.timed(engine.validate, "validate")

    def timed(self, fn, name):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if name == "train_one_epoch":  # (trainer, loader, epoch, iter_log, progress)
                epoch = kwargs["epoch"] if "epoch" in kwargs else args[2]
                self.last = epoch == self.epochs
            if not self.last:
                return fn(*args, **kwargs)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                result = fn(*args, **kwargs)
                self.walls[name] = time.perf_counter() - t0
            self.profiles[name] = prof.key_averages()
            return result
        return wrapper


def pieces_table(events, walls):
    """Each piece's total CPU time (its events' own and children's) over the training wall."""
    train_wall = walls["train_one_epoch"]
    totals = {piece: 0.0 for piece in PIECES}
    for e in events:
        for piece, prefix in PIECES.items():
            if e.key.startswith(prefix):
                totals[piece] += e.cpu_time_total / 1e6
    lines = [f"training epoch under the profiler: {train_wall:.2f} s wall; validation "
             f"{walls['validate']:.2f} s wall",
             "| piece of the training epoch | seconds | share of training wall |",
             "| --- | --- | --- |"]
    for piece, seconds in totals.items():
        lines.append(f"| {piece} | {seconds:.2f} | {seconds / train_wall:.1%} |")
    rest = train_wall - sum(totals.values())
    lines.append(f"| rest (the loop itself, sigmoid, to_device, logging) | {rest:.2f} | "
                 f"{rest / train_wall:.1%} |")
    return lines


def operators_table(profiles, walls, top=TOP):
    """The top operators by self CPU time over the profiled epoch (training + validation)."""
    wall = walls["train_one_epoch"] + walls["validate"]
    ops = {}
    for events in profiles.values():
        for e in events:
            if e.key.startswith(("aten::", "mkldnn", "Optimizer.")):
                calls, seconds = ops.get(e.key, (0, 0.0))
                ops[e.key] = (calls + e.count, seconds + e.self_cpu_time_total / 1e6)
    lines = [f"| operator | calls | self CPU s | share of the epoch's {wall:.1f} s |",
             "| --- | --- | --- | --- |"]
    for key, (calls, seconds) in sorted(ops.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"| `{key}` | {calls} | {seconds:.2f} | {seconds / wall:.1%} |")
    return lines


def epochs_of(flags):
    """The epochs of the run train_model.py makes with these flags (--epochs N or
    --epochs=N; else --demo's, else EPOCHS)."""
    for i, flag in enumerate(flags):
        if flag == "--epochs" and i + 1 < len(flags):
            return int(flags[i + 1])
        if flag.startswith("--epochs="):
            return int(flag.split("=", 1)[1])
    if "--demo" in flags:
        return DEMO_EPOCHS
    return settings.defaults(settings.read_script(REPO / "train_model.py"))["EPOCHS"]


def run_train_model(flags):
    """`python train_model.py FLAGS` in this process (as __main__); its exit code."""
    script, argv = REPO / "train_model.py", sys.argv
    sys.argv = [str(script), *flags]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return exc.code
    finally:
        sys.argv = argv
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ours, theirs = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
        else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--model-dir", default=None, help="default: a temporary folder")
    args = p.parse_args(ours)
    epochs = epochs_of(theirs)
    model_dir = args.model_dir or tempfile.mkdtemp(prefix="profile-epoch-")
    profiled = Profiled(epochs)
    profiled.install()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); profiling epoch "
          f"{epochs} of: train_model.py --data {args.data} --model-dir {model_dir} "
          f"{' '.join(theirs)}", flush=True)
    code = run_train_model(["--data", args.data, "--model-dir", model_dir, *theirs])
    if code or len(profiled.profiles) < 2:
        sys.exit(f"the run ended with {code} before its last epoch was profiled")
    print("\n".join(pieces_table(profiled.profiles["train_one_epoch"], profiled.walls) + [""]
                    + operators_table(profiled.profiles, profiled.walls)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
