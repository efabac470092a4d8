"""benchmarks/pipeline.py's precision table: GFLOP/s and share of peak from known figures."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import pipeline  # noqa: E402


def test_precision_table_divides_by_the_peak_of_its_own_precision():
    variants = {name: {"mixed": mixed, "channels_last": cl, "train": [5.0, ips], "infer": [ips * 4]}
                for (name, mixed, cl), ips in zip(pipeline.PRECISION_VARIANTS, (10, 12, 20, 25))}
    case = {"encoder": "resnet18", "size": [128, 128], "batch": 8, "steps": 4,
            "train_flops": 2e9, "infer_flops": 0.5e9,
            "peak": {"float32": 40.0, "bf16": 200.0}, "variants": variants}
    lines = pipeline.precision_lines(case)
    rows = {line[2:28].strip(): line[28:].split() for line in lines
            if line[2:28].strip() in variants}
    # float32: 10 images/s x 2 GFLOP = 20 GFLOP/s, half of the float32 peak; inference 40 x 0.5
    assert rows["float32"] == ["10.00", "20", "50%", "40.00", "20", "50%"]
    # bf16 + channels_last: 25 x 2 = 50 GFLOP/s against the bf16 peak of 200
    assert rows["bf16 + channels_last"] == ["25.00", "50", "25%", "100.00", "50", "25%"]
    ratio = next(line for line in lines if "bf16 / float32" in line)
    assert "training 2.00x, with channels_last 2.50x" in ratio
    json_case = pipeline.precision_json(case)
    assert json_case["bf16"]["train_share_of_peak"] == 0.2  # 20 x 2 / 200


def test_flops_per_image_counts_the_backward_pass_too():
    train, infer = pipeline.flops_per_image("resnet18", (64, 64), 2)
    # a convolution's backward costs about twice its forward (input and weight gradients);
    # the first layer needs no input gradient, so a little under 3x
    assert 2.5 * infer < train < 3.0 * infer
