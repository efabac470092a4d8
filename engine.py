"""The training engine: one training step, one validation, the learning-rate rule and the
optimiser. train_model.py runs them; the benchmarks time these same functions."""
import copy
import math
from dataclasses import dataclass, replace

import torch

import metrics
import preprocess
from device import autocast, autocast_dtype, gather, sum_over_processes, to_device


def lr_for_epoch(epoch, lr, drop_epoch, lr_after):
    """Learning rate of a 1-based epoch: `lr` through epoch `drop_epoch`, then `lr_after`.

    A rule on the epoch number, so a resumed run lands on the same schedule."""
    return lr if epoch <= drop_epoch else lr_after


SCHEDULES = ("step", "cosine", "poly")
POLY_POWER = 0.9  # nnU-Net's poly decay: lr * (1 - t/T) ** 0.9


@dataclass(frozen=True)
class LRPlan:
    """The learning rate of every training step of a run (steps counted from 0 over all
    epochs): a linear warm-up over `warmup` steps, then `kind`'s rule. A rule on the step
    number alone, so a resumed run lands on the same rates."""
    kind: str  # "step": `lr` through step `drop`, then `lr_after`; "cosine": down to 0;
    #            "poly": (1 - t/T)^0.9, as nnU-Net
    lr: float
    total: int  # steps in the run
    warmup: int = 0
    drop: int = 0  # "step": the first step at lr_after
    lr_after: float = 0.0


def lr_at_step(t, plan):
    if t < plan.warmup:
        return plan.lr * (t + 1) / plan.warmup
    if plan.kind == "step":
        return plan.lr if t < plan.drop else plan.lr_after
    done = (t - plan.warmup) / max(1, plan.total - plan.warmup)
    if plan.kind == "cosine":
        return plan.lr * 0.5 * (1.0 + math.cos(math.pi * done))
    return plan.lr * (1.0 - done) ** POLY_POWER


OPTIMIZERS = ("adam", "adamw", "sgd")
SGD_MOMENTUM = 0.99  # nnU-Net's SGD: Nesterov momentum 0.99


def make_optimizer(model, lr, device, kind="adam", weight_decay=0.0):
    """Adam (the paper's), AdamW (decoupled weight decay) or nnU-Net's SGD with Nesterov
    momentum 0.99, over every parameter. Adam and AdamW use the fused kernel on the CPU: the
    per-parameter loop took 12-16% of a resnet18 step at 128x128 there, the fused one a
    seventh of that (docs/speed.md); CUDA keeps torch's default (foreach) implementation."""
    fused = True if device.type == "cpu" else None
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=SGD_MOMENTUM, nesterov=True,
                               weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                                 fused=fused)
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, fused=fused)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:  # every group, not only the decoder's
        group["lr"] = lr


class WeightAverage:
    """An exponential moving average of a model's weights and batch-norm statistics, updated
    after each optimiser step. The decay warms up as timm's ModelEmaV3 does, min(decay,
    (1 + n) / (10 + n)) at the n-th update, so the early average is not stuck near the random
    start of a short run. Integer buffers (batch counts) are copied."""

    def __init__(self, model, decay, updates=0):
        self.model = copy.deepcopy(getattr(model, "module", model)).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.decay, self.updates = decay, updates

    @torch.no_grad()
    def update(self, model):
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        source = getattr(model, "module", model).state_dict()  # by name: the model may
        for key, mine in self.model.state_dict().items():  # hold more (deep supervision)
            theirs = source[key]
            if mine.is_floating_point():
                mine.lerp_(theirs.detach(), 1.0 - d)
            else:
                mine.copy_(theirs)


def make_scaler(device, mixed):
    """A GradScaler where float16 autocast needs the loss scaled; None for bfloat16 (CUDA or
    CPU), which has float32's range, and for float32."""
    return torch.amp.GradScaler("cuda") if autocast_dtype(device, mixed) == torch.float16 \
        else None


def optimizer_step(loss, optimizer, scaler=None):
    """Backward and step; through the GradScaler when float16 autocast needs one."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def weights_finite(model):
    """True when no weight or batch-norm statistic is NaN or infinite."""
    return all(torch.isfinite(t).all() for t in model.state_dict().values()
               if t.is_floating_point())


class NonFiniteLoss(RuntimeError):
    """The loss or the model became NaN or infinite; the message names the epoch and step."""


@dataclass
class Trainer:
    """The model and how a step runs on it: what train_one_epoch and validate need."""
    model: torch.nn.Module
    loss_fn: object
    device: torch.device
    optimizer: object = None
    scaler: object = None  # a GradScaler under float16 autocast
    mixed: bool = False  # autocast (see autocast())
    channels_last: bool = False
    threshold: float = 0.5
    plan: LRPlan = None  # per-step learning rates; None: the rate set per epoch stays
    average: WeightAverage = None  # the moving average of the weights, when one is kept

    def logits(self, images):
        with autocast(self.device, self.mixed):
            return self.model(to_device(images, self.device, self.channels_last))


def evaluated(trainer):
    """The trainer that validation and the checkpoints see: the weight average's model where
    one is kept, else the model trained."""
    if trainer.average is None:
        return trainer
    return replace(trainer, model=trainer.average.model)


@dataclass
class EpochResult:
    loss: float  # mean training loss over the images trained on
    images: int  # images trained on, all processes together
    skipped: int  # images read but skipped with a batch that came back empty elsewhere


def train_one_epoch(trainer, loader, epoch, iter_log=None, progress=True):
    """One pass over the training loader: the training step, batch after batch.

    `iter_log`, when a list, receives (loss, mean IoU of the batch at network size) per step:
    the paper's Figures 8 and 9."""
    from tqdm import tqdm

    trainer.model.train()
    total, seen, skipped = 0.0, 0, 0
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not progress)
    for step, batch in enumerate(bar, 1):
        # every file of the batch became unreadable: skip the step, and under torchrun every
        # process skips it, or the others would wait in the gradient all-reduce for this one
        (empty,) = sum_over_processes(1.0 if batch is None else 0.0)
        if empty:
            skipped += 0 if batch is None else len(batch[0])  # read, but skipped with it
            continue
        if trainer.plan is not None:  # the run's step number: the same on a resume
            set_lr(trainer.optimizer, lr_at_step((epoch - 1) * len(loader) + step - 1,
                                                 trainer.plan))
        images, masks = batch[0], batch[1].to(trainer.device)
        logits = trainer.logits(images)
        loss = trainer.loss_fn(logits.float(), masks)  # in float32: float16 sums overflow
        loss_value = loss.item()  # one device sync per step, reused below
        _stop_if_not_finite(loss_value, epoch, step)
        optimizer_step(loss, trainer.optimizer, trainer.scaler)
        if trainer.average is not None:
            trainer.average.update(trainer.model)
        n = images.shape[0]
        total += loss_value * n
        seen += n
        if iter_log is not None:
            with torch.no_grad():
                counts = metrics.batch_confusion(torch.sigmoid(logits.float()), masks,
                                                 trainer.threshold)
            iter_log.append((loss_value, metrics.mean_scores(counts.tolist())["iou"]))
        bar.set_postfix(loss=f"{total / seen:.4f}")
    total, seen, skipped = sum_over_processes(total, seen, skipped)
    return EpochResult(total / max(seen, 1), int(seen), int(skipped))


def _stop_if_not_finite(loss_value, epoch, step):
    """Under torchrun every process learns of a NaN anywhere and stops at the same step,
    before the optimiser step: the weights and every checkpoint stay as they were."""
    (broken,) = sum_over_processes(0.0 if math.isfinite(loss_value) else 1.0)
    if broken:
        value = loss_value if not math.isfinite(loss_value) else "NaN in another process"
        raise NonFiniteLoss(f"the training loss became {value} at epoch {epoch}, step {step}; "
                            f"stopped before updating the model (the best checkpoint is "
                            f"untouched). Lower LR, or turn MIXED_PRECISION off.")


@torch.inference_mode()
def validate(trainer, loader, threads=2):
    """Mean loss (at network size) and the per-image means, at each image's original size, of
    the metrics the registry logs (metrics.names(logged=True)).

    Each probability map is resized to its true mask's size and cut at the threshold by
    metrics.score_at_original, as test_model.py --evaluate scores it, so the CSV, the choice
    of the best checkpoint and the evaluation report the same numbers. The true masks come
    with the batches (packed bits, from the cache): no original is decoded per epoch or held
    beyond its batch."""
    trainer.model.eval()
    losses = []

    def per_image():
        for batch in loader:
            if batch is None:
                continue
            images, masks, _, truths = batch
            logits = trainer.logits(images).float()
            losses.append((trainer.loss_fn(logits, masks.to(trainer.device)).item(),
                           len(images)))
            for prob, (bits, hw) in zip(torch.sigmoid(logits)[:, 0].cpu().numpy(), truths):
                yield prob, bits, hw

    def score(prob, bits, hw):  # in the scoring threads, beside the model
        return metrics.score_at_original(prob, preprocess.unpack_truth(bits, hw),
                                         trainer.threshold, only=logged)[1]

    # the registry's logged metrics; each process scores its share of the images, and every
    # image is counted once, everywhere
    logged = metrics.names(logged=True)
    scored = gather(preprocess.ordered_map(score, per_image(), threads))
    result = metrics.means(scored, logged)
    total, seen = sum_over_processes(sum(loss * n for loss, n in losses),
                                     sum(n for _, n in losses))
    result["loss"] = total / seen if seen else float("nan")
    return result
