"""Where and how the network computes: the device, the precision (bfloat16 or float16 autocast,
channels_last) and, under torchrun, the processes that train together."""
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from settings import SettingError


DEVICES = ("auto", "cpu", "cuda")  # the choices of DEVICE


def pick_device(name):
    """torch.device for DEVICE ("auto", "cuda" or "cpu")."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SettingError("DEVICE='cuda' but no CUDA device is available; use --device auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def cpu_has_native_bf16():
    """True where the processor computes in bfloat16 itself (AVX-512 BF16 or AMX), so oneDNN's
    bf16 convolutions are faster than float32. oneDNN's own bf16 test alone is not enough: it
    passes on any AVX-512 processor, where bf16 is emulated and slower than float32."""
    return (torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported()
            and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))


def autocast_dtype(device, mixed):
    """The dtype autocast computes in on `device` when `mixed`, or None (float32): bfloat16
    (else float16) on CUDA, bfloat16 on a CPU with native bf16, float32 on other CPUs."""
    if not mixed:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def autocast(device, mixed):
    """Autocast in autocast_dtype(device, mixed); nothing where that is float32."""
    dtype = autocast_dtype(device, mixed)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def use_channels_last(device, channels_last, mixed):
    """channels_last where it is faster: on CUDA, and on the CPU under bfloat16 only
    (benchmarks/pipeline.py: faster there for the paper's encoder; in float32 it did not
    speed up training on the CPU)."""
    if device.type == "cuda":
        return channels_last
    return channels_last and autocast_dtype(device, mixed) is not None


def precision_line(device, mixed, channels_last):
    """What the model computes in, for the startup line; losses and metrics stay float32."""
    dtype = autocast_dtype(device, mixed)
    if dtype is None:
        why = "" if not mixed or device.type != "cpu" else \
            " (this CPU has no native bfloat16: no AVX-512 BF16 or AMX)"
        text = f"float32{why}"
    else:
        text = f"{str(dtype).replace('torch.', '')} autocast (loss, metrics, probabilities " \
               f"in float32)"
    return text + (", channels_last" if use_channels_last(device, channels_last, mixed) else "")


def to_device(images, device, channels_last):
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def world_size():
    """Processes training together: torchrun's WORLD_SIZE, 1 for a plain `python` run."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    return dist.get_rank() if world_size() > 1 else 0


def main_process():
    """Only the first process prints, writes the CSV, the figures and the checkpoints."""
    return rank() == 0


def gather(values):
    """Every process's list of values, concatenated in rank order (one process: as is)."""
    if world_size() == 1:
        return list(values)
    everyone = [None] * world_size()
    dist.all_gather_object(everyone, list(values))
    return [v for part in everyone for v in part]


def sum_over_processes(*numbers):
    if world_size() == 1:
        return numbers
    total = torch.tensor(numbers, dtype=torch.float64)
    dist.all_reduce(total)  # a CPU tensor: gloo carries it (beside NCCL on CUDA runs)
    return tuple(total.tolist())


@dataclass(frozen=True)
class Compute:
    """The device and the precision settings asked for; what of them runs there follows."""
    device: torch.device
    mixed_precision: bool = False  # MIXED_PRECISION as set
    channels_last_setting: bool = False  # CHANNELS_LAST as set

    @property
    def mixed(self):
        """Autocast on: bfloat16 or float16 on CUDA, bfloat16 on a CPU with native bf16."""
        return autocast_dtype(self.device, self.mixed_precision) is not None

    @property
    def channels_last(self):
        return use_channels_last(self.device, self.channels_last_setting, self.mixed_precision)

    def line(self):
        """The startup line that says where and in what precision the model computes."""
        precision = precision_line(self.device, self.mixed_precision, self.channels_last_setting)
        if self.device.type == "cpu":
            return (f"device: CPU (no CUDA device in use; training is far slower than on a "
                    f"GPU), {precision}")
        return f"device: {torch.cuda.get_device_name(self.device)}, {precision}"


def prepare(name, mixed_precision, channels_last, cudnn_benchmark=True, deterministic=False):
    """The Compute of the settings DEVICE, MIXED_PRECISION, CHANNELS_LAST, CUDNN_BENCHMARK
    and DETERMINISTIC, with cuDNN set up on CUDA."""
    device = pick_device(name)
    if device.type == "cuda":
        if world_size() > 1:  # torchrun: the GPU this process was given
            device = torch.device("cuda", torch.cuda.current_device())
        torch.backends.cudnn.benchmark = cudnn_benchmark and not deterministic
        if deterministic:  # the documented cost: slower kernels, no autotuning
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.deterministic = True
            torch.use_deterministic_algorithms(True, warn_only=True)
    return Compute(device, mixed_precision, channels_last)
