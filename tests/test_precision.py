"""The precision the model computes in: bfloat16 autocast where the processor has it natively,
float32 elsewhere; losses and probabilities stay float32 either way."""

import pytest
import torch

import model as model_lib
import train_model
import device as device_lib
import predict

CPU = torch.device("cpu")


@pytest.mark.parametrize("native, mixed, dtype", [(True, True, torch.bfloat16),
                                                   (False, True, None), (True, False, None)])
def test_cpu_precision_follows_the_processor_and_the_setting(monkeypatch, native, mixed, dtype):
    monkeypatch.setattr(device_lib, "cpu_has_native_bf16", lambda: native)
    assert device_lib.autocast_dtype(CPU, mixed) == dtype
    # channels_last goes with bf16 on the CPU, as measured; never on a float32 CPU run
    assert device_lib.use_channels_last(CPU, True, mixed) == (dtype is not None)
    line = device_lib.precision_line(CPU, mixed, True)
    assert line.startswith("bfloat16 autocast" if dtype else "float32")
    assert ("no native bfloat16" in line) == (mixed and not native)


def test_startup_line_and_flags_say_what_the_cpu_computes_in(monkeypatch):
    for native, expected in ((True, (True, True)), (False, (False, False))):
        args = train_model.parse_args(["--device", "cpu"])  # MIXED_PRECISION, CHANNELS_LAST
        monkeypatch.setattr(device_lib, "cpu_has_native_bf16", lambda: native)
        compute = device_lib.prepare(args.device, args.mixed_precision, args.channels_last)
        assert compute.device == CPU
        assert (compute.mixed, compute.channels_last) == expected
        line = compute.line()
        assert ("bfloat16 autocast" in line) == native and ("float32" in line)


def test_bf16_probabilities_are_float32_and_near_the_float32_ones(monkeypatch):
    monkeypatch.setattr(device_lib, "cpu_has_native_bf16", lambda: True)  # emulated elsewhere
    torch.manual_seed(0)
    model = model_lib.build_model("resnet18", None, 5).eval()
    images = torch.randn(2, 3, 64, 64)
    exact = predict.probabilities(model, images, CPU)
    low = predict.probabilities(model, images, CPU, mixed=True, channels_last=True)
    assert low.dtype == torch.float32 and low.shape == (2, 64, 64)
    assert not torch.equal(low, exact)  # bfloat16 did run
    assert (low - exact).abs().max() < 0.05
