"""Export a trained model to one ONNX file that takes a raw image and returns its mask.

    python export_model.py --checkpoint Model/demo/demo_fpn_resnet18.pth   # -> ...resnet18.onnx
    python export_model.py --checkpoint Model/ --tta flips           # an ensemble, flipped views
    python export_model.py --info Model/demo/demo_fpn_resnet18.onnx  # what a file holds

The graph's input is one RGB image, uint8 (H, W, 3), of any size; its outputs are the lesion
probability (H, W) float32 and the mask (H, W) uint8 0/255, both at the image's own size.
Inside it are the steps test_model.py takes: the resize to each member's network size with its
interpolation (OpenCV's area averaging, rounded to uint8, as in training), the mean and std,
the network, the sigmoid, the mean over test-time views and ensemble members, the linear
resize back and the threshold. Only the network is traced, at its fixed network size;
every step that depends on the image's size is written here as ONNX operators that read it
when the graph runs. Edit the constants below, or pass the matching flag.
"""
import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

import device as device_lib
import predict
import preprocess
import settings as settings_lib
from checkpoint import CheckpointError, input_settings
from predict import UsageError
from settings import Setting, SettingError

# ----------------------------------------------------------------------------- settings
MODEL_DIR = "Model"
CHECKPOINT = None
OUT = None                         # None: <run name>.onnx beside the (first) checkpoint
TTA = "none"
THRESHOLD = None                   # None: the checkpoint's
OPSET = 20                         # onnxruntime >= 1.18 runs it
CHECK_SIZE = (200, 300)            # (height, width), unlike any network size

SETTINGS = [  # every one is a flag (settings.py)
    Setting("MODEL_DIR", "where the default checkpoint (the newest best model) is looked for"),
    Setting("CHECKPOINT", "checkpoint file(s) or folder(s); several: an ensemble in one graph",
            nargs="+", metavar="PATH"),
    Setting("OUT", "the ONNX file to write; default: <run name>.onnx beside the (first) "
            "checkpoint"),
    Setting("TTA", "test-time views inside the graph", choices=("none", "flips")),
    Setting("THRESHOLD", "mask cut; default: the one stored in the (first) checkpoint",
            type=float),
    Setting("OPSET", "ONNX opset of the graph"),
    Setting("CHECK_SIZE", "(height, width) of the generated image the export is checked on "
            "against PyTorch", metavar=("H", "W")),
]
# ---------------------------------------------------------------------------------------

TTAS = ("none", "flips")  # views the graph can hold (rot90 would need a square size)


# ----------------------------------------------------------------------------- graph builder

class Graph:
    """A few helpers around onnx.helper: each op() returns the name of a fresh output."""

    def __init__(self, parent=None):
        self.nodes, self.inits = [], []
        self.counter = parent.counter if parent else [0]  # names unique across subgraphs

    def name(self, hint):
        self.counter[0] += 1
        return f"{hint}_{self.counter[0]}"

    def const(self, value, dtype=None, hint="c"):
        from onnx import numpy_helper
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def op(self, op_type, *inputs, outputs=1, **attrs):
        from onnx import helper
        names = [self.name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names


def axis_scale(g, n, m):
    """(n as float64, the source step s) of an axis of length n resized to m: cv2 computes
    s as 1 / (m / n) in double precision, and so does the graph."""
    nf = g.op("Cast", n, to=11)
    return nf, g.op("Div", g.const(1.0, np.float64), g.op("Div", g.const(m, np.float64), nf))


def area_taps(g, n, m, whole):
    """Gather indices (m, K) int64 and weights (m, K) float32 of cv2's INTER_AREA shrink of an
    axis of length n (a scalar int64 tensor, known only when the graph runs) to m.

    As cv2's resizeArea tables: output i averages the input span [i*s, (i+1)*s), partial
    pixels under 1e-3 dropped, K = ceil(s) + 1 taps. `whole` (a bool scalar): both sides
    shrink by whole factors, where cv2 sums the pixels and scales the sum once; the weights
    are then 1 and resize_image scales. The tables are computed in float64, as cv2's."""
    D, L = np.float64, np.int64
    nf, s = axis_scale(g, n, m)
    i = g.op("Cast", g.op("Range", g.const(0, L), g.const(m, L), g.const(1, L)), to=11)
    i = g.op("Unsqueeze", i, g.const([1], L))                                    # (m, 1)
    k = g.op("Add", g.op("Cast", g.op("Ceil", s), to=7), g.const(1, L))
    ks = g.op("Cast", g.op("Range", g.const(0, L), k, g.const(1, L)), to=11)
    ks = g.op("Unsqueeze", ks, g.const([0], L))                                  # (1, K)
    a = g.op("Mul", i, s)  # output i spans [a, b); input pixel j spans [j, j + 1)
    b = g.op("Add", a, s)
    j = g.op("Add", g.op("Floor", a), ks)                                        # (m, K)
    overlap = g.op("Sub", g.op("Min", b, g.op("Add", j, g.const(1.0, D))), g.op("Max", a, j))
    overlap = g.op("Where", g.op("Greater", overlap, g.const(1e-3, D)), overlap,
                   g.const(0.0, D))
    cell = g.op("Min", s, g.op("Sub", nf, a))  # the last cell may be cut by the border
    weight = g.op("Where", whole, overlap, g.op("Div", overlap, cell))
    last = g.op("Sub", nf, g.const(1.0, D))
    index = g.op("Cast", g.op("Min", j, last), to=7)
    return index, g.op("Cast", weight, to=1)


def linear_taps(g, n, m, clamp):
    """(first index, second index, first weight, second weight), each (m,) int64, of cv2's
    INTER_LINEAR on uint8: source position (i + 0.5) s - 0.5 in float32, weights rounded to
    11 bits (2048 = 1). Horizontally (`clamp`) cv2 pins positions outside to the edge pixel;
    vertically it keeps the weights and clips the row indices."""
    D, F, L = np.float64, np.float32, np.int64
    nf, s = axis_scale(g, n, m)
    i = g.op("Cast", g.op("Range", g.const(0, L), g.const(m, L), g.const(1, L)), to=11)
    x = g.op("Cast", g.op("Sub", g.op("Mul", g.op("Add", i, g.const(0.5, D)), s),
                          g.const(0.5, D)), to=1)
    x0 = g.op("Floor", x)
    frac = g.op("Sub", x, x0)
    last = g.op("Sub", g.op("Cast", nf, to=1), g.const(1.0, F))
    if clamp:
        outside = g.op("Or", g.op("Less", x0, g.const(0.0, F)),
                       g.op("GreaterOrEqual", x0, last))
        frac = g.op("Where", outside, g.const(0.0, F), frac)
    first = g.op("Min", g.op("Max", x0, g.const(0.0, F)), last)
    second = g.op("Min", g.op("Max", g.op("Add", x0, g.const(1.0, F)), g.const(0.0, F)), last)
    w0 = g.op("Round", g.op("Mul", g.op("Sub", g.const(1.0, F), frac), g.const(2048.0, F)))
    w1 = g.op("Round", g.op("Mul", frac, g.const(2048.0, F)))
    return [g.op("Cast", t, to=7) for t in (first, second, w0, w1)]


def area_rows(g, image, H, h, whole):
    """The height half of cv2's INTER_AREA, (H, W, 3) uint8 -> (h, W, 3) float32, from
    running sums: output row i is the sum of the whole rows in its span [i*s, (i+1)*s) (the
    difference of two int32 running sums, exact) over the cell, plus the partial rows at
    either end by their share (cv2's tables: shares under 1e-3 dropped). About one pass over
    the image, where gathered taps would make a copy of it K times over."""
    D, L = np.float64, np.int64
    nf, s = axis_scale(g, H, h)
    i = g.op("Cast", g.op("Range", g.const(0, L), g.const(h, L), g.const(1, L)), to=11)
    a = g.op("Mul", i, s)
    b = g.op("Add", a, s)
    first, end = g.op("Ceil", a), g.op("Min", g.op("Floor", b), nf)  # whole rows [first, end)
    cell = g.op("Min", s, g.op("Sub", nf, a))

    def share(x):  # a partial row's share of the cell
        x = g.op("Where", g.op("Greater", x, g.const(1e-3, D)), x, g.const(0.0, D))
        return g.op("Where", whole, x, g.op("Div", x, cell))
    w_left = share(g.op("Sub", first, a))
    w_right = share(g.op("Min", g.op("Sub", b, end), g.const(1.0, D)))
    w_whole = g.op("Where", whole, g.const(1.0, D), g.op("Div", g.const(1.0, D), cell))
    last = g.op("Sub", nf, g.const(1.0, D))

    def rows_at(x, index):  # (h, W, 3) rows of x at float64 indices (clipped)
        index = g.op("Min", g.op("Max", index, g.const(0.0, D)), last)
        return g.op("Gather", x, g.op("Cast", index, to=7), axis=0)

    def by(x, weight):  # rows times a float32 weight per row
        return g.op("Mul", g.op("Cast", x, to=1),
                    g.op("Unsqueeze", g.op("Cast", weight, to=1), g.const([1, 2], L)))
    def where_positive(x, value):  # rows of x kept where value > 0, else 0 (int32)
        keep = g.op("Cast", g.op("Greater", value, g.const(0.0, D)), to=6)
        return g.op("Mul", x, g.op("Unsqueeze", keep, g.const([1, 2], L)))
    # pairs of rows summed on uint8 by a 2x1 integer convolution (int32 out): the running
    # sum then covers half the rows, and a cast of the whole image is never made
    flat = g.op("Reshape", image, g.op("Concat", g.const([1, 1], L),
                                       g.op("Unsqueeze", H, g.const([0], L)),
                                       g.const([-1], L), axis=0))
    pairs = g.op("ConvInteger", flat, g.const(np.ones((1, 1, 2, 1), np.uint8)),
                 kernel_shape=[2, 1], strides=[2, 1])
    pairs = g.op("Reshape", pairs, g.op("Concat", g.const([-1], L),
                                        g.op("Slice", g.op("Shape", image), g.const([1], L),
                                             g.const([3], L)), axis=0))
    sums = g.op("CumSum", pairs, g.const(0, L))  # sums[q]: rows 0 .. 2q + 1
    nf_pairs = g.op("Cast", g.op("Div", H, g.const(2, L)), to=11)

    def rows_before(j):  # sum of rows 0 .. j - 1, int32 (h, W, 3), j float64 (h,)
        q = g.op("Floor", g.op("Div", j, g.const(2.0, D)))
        index = g.op("Min", g.op("Max", g.op("Sub", q, g.const(1.0, D)), g.const(0.0, D)),
                     g.op("Sub", nf_pairs, g.const(1.0, D)))
        done = where_positive(g.op("Gather", sums, g.op("Cast", index, to=7), axis=0), q)
        odd = g.op("Sub", j, g.op("Mul", q, g.const(2.0, D)))  # row 2q when j is odd
        extra = where_positive(g.op("Cast", rows_at(image, g.op("Mul", q, g.const(2.0, D))),
                                    to=6), odd)
        return g.op("Add", done, extra)
    whole_rows = by(g.op("Sub", rows_before(end), rows_before(first)), w_whole)
    left = by(rows_at(image, g.op("Sub", first, g.const(1.0, D))), w_left)
    right = by(rows_at(image, end), w_right)
    return g.op("Add", g.op("Add", whole_rows, left), right)


def area_branch(g, image, H, W, size_hw):
    """cv2's INTER_AREA shrink of uint8 (H, W, 3) to float32 (h, w, 3) integer values."""
    L = np.int64
    h, w = size_hw
    # whole factors on both sides: cv2's fast area path, sum * float32(1 / (sx * sy))
    whole = g.op("And", g.op("Equal", g.op("Mod", W, g.const(w, L)), g.const(0, L)),
                 g.op("Equal", g.op("Mod", H, g.const(h, L)), g.const(0, L)))
    cells = g.op("Mul", g.op("Div", W, g.const(w, L)), g.op("Div", H, g.const(h, L)))
    scale = g.op("Where", whole, g.op("Div", g.const(1.0, np.float32),
                                      g.op("Cast", cells, to=1)), g.const(1.0, np.float32))
    rows = area_rows(g, image, H, h, whole)                                      # (h, W, 3)
    # channels ahead of the columns, so that the taps and their weights are the last axes
    rows = g.op("Transpose", rows, perm=[0, 2, 1])                               # (h, 3, W)
    ix, wx = area_taps(g, W, w, whole)
    cols = g.op("Gather", rows, ix, axis=2)                                      # (h, 3, w, K)
    small = g.op("ReduceSum", g.op("Mul", cols, wx), g.const([3], L), keepdims=0)
    small = g.op("Mul", g.op("Transpose", small, perm=[0, 2, 1]), scale)         # (h, w, 3)
    # cv2 rounds half to even (Round), except its 2x2 fast path: (sum + 2) >> 2, half up
    half_up = g.op("And", whole, g.op("Equal", cells, g.const(4, L)))
    small = g.op("Where", half_up, g.op("Floor", g.op("Add", small, g.const(0.5, np.float32))),
                 g.op("Round", small))
    return g.op("Clip", small, g.const(0.0, np.float32), g.const(255.0, np.float32))


def linear_branch(g, image, H, W, size_hw):
    """cv2's INTER_LINEAR of uint8 (H, W, 3) to float32 (h, w, 3), in its integer arithmetic:
    a horizontal pass of 11-bit weights, then the vertical pass of its SIMD code,
    ((row0 >> 4) * b0 >> 16) + ((row1 >> 4) * b1 >> 16), rounded by (t + 2) >> 2."""
    L = np.int64
    h, w = size_hw
    x0, x1, a0, a1 = linear_taps(g, W, w, clamp=True)
    y0, y1, b0, b1 = linear_taps(g, H, h, clamp=False)
    pixels = g.op("Cast", image, to=7)
    per_column = g.const([1], L)  # weights of shape (w, 1) against (H, w, 3)

    def weighted(x, index, weight, axis, expand):
        return g.op("Mul", g.op("Gather", x, index, axis=axis), g.op("Unsqueeze", weight,
                                                                     expand))
    row = g.op("Add", weighted(pixels, x0, a0, 1, per_column),
               weighted(pixels, x1, a1, 1, per_column))                          # (H, w, 3)

    def high(index, weight):  # (row >> 4) * b >> 16, values are never negative
        top = g.op("Div", g.op("Gather", row, index, axis=0), g.const(16, L))
        return g.op("Div", g.op("Mul", top, g.op("Unsqueeze", weight, g.const([1, 2], L))),
                    g.const(65536, L))
    t = g.op("Add", high(y0, b0), high(y1, b1))
    small = g.op("Div", g.op("Add", t, g.const(2, L)), g.const(4, L))
    return g.op("Cast", g.op("Clip", small, g.const(0, L), g.const(255, L)), to=1)


def resize_image(g, image, size_hw, interpolation):
    """uint8 (H, W, 3) -> float32 (h, w, 3) holding the uint8 values cv2.resize gives
    (preprocess.resize_pair): area to shrink (both sides), else linear. An If node runs
    only the branch the image's size calls for."""
    from onnx import helper
    L = np.int64
    shape = g.op("Shape", image)
    H = g.op("Gather", shape, g.const(0, L), axis=0)
    W = g.op("Gather", shape, g.const(1, L), axis=0)
    h, w = size_hw
    if interpolation == "linear":
        return linear_branch(g, image, H, W, size_hw)
    if interpolation != "area":
        raise SettingError(f"interpolation {interpolation!r} has no ONNX form here")
    shrink = g.op("And", g.op("GreaterOrEqual", H, g.const(h, L)),
                  g.op("GreaterOrEqual", W, g.const(w, L)))
    branches = []
    for make in (area_branch, linear_branch):
        sub = Graph(g)
        out = make(sub, image, H, W, size_hw)
        branches.append(helper.make_graph(
            sub.nodes, sub.name("branch"), [],
            [helper.make_tensor_value_info(out, onnx_float(), [h, w, 3])], sub.inits))
    return g.op("If", shrink, then_branch=branches[0], else_branch=branches[1])


def onnx_float():
    from onnx import TensorProto
    return TensorProto.FLOAT


def normalise(g, small, settings):
    """(h, w, 3) 0..255 -> (1, 3, h, w) in the float32 arithmetic of preprocess.to_tensor."""
    scale = np.float32(255)
    shift = np.float32(settings.mean) * scale
    factor = np.float32(1) / (np.float32(settings.std) * scale)
    x = g.op("Mul", g.op("Sub", small, g.const(shift)), g.const(factor))
    return g.op("Unsqueeze", g.op("Transpose", x, perm=[2, 0, 1]), g.const([0], np.int64))


def flip(g, x, axes):
    L = np.int64
    return g.op("Slice", x, g.const([-1] * len(axes), L), g.const([-2 ** 63] * len(axes), L),
                g.const(list(axes), L), g.const([-1] * len(axes), L))


def network(g, net, x, prefix):
    """Inline an exported FPN (input (N, 3, h, w) -> logits (N, 1, h, w)) under `prefix`."""
    from onnx import compose, helper
    net = compose.add_prefix(net, prefix)
    graph = net.graph
    g.nodes.append(helper.make_node("Identity", [x], [graph.input[0].name]))
    g.nodes.extend(graph.node)
    g.inits.extend(graph.initializer)
    return graph.output[0].name


def member_probability(g, net, settings, image, tta, prefix):
    """(h, w) float32 mean lesion probability over the views, at the member's network size:
    model.tta_probabilities's views (identity, horizontal, vertical, both) in one batch."""
    x = normalise(g, resize_image(g, image, settings.size_hw, settings.interpolation), settings)
    if tta == "flips":
        x = g.op("Concat", x, flip(g, x, [3]), flip(g, x, [2]), flip(g, x, [2, 3]), axis=0)
    probs = g.op("Sigmoid", network(g, net, x, prefix))
    if tta == "flips":
        views = g.op("Split", probs, g.const([1, 1, 1, 1], np.int64), axis=0, outputs=4)
        back = [views[0], flip(g, views[1], [3]), flip(g, views[2], [2]),
                flip(g, views[3], [2, 3])]
        probs = g.op("Concat", *back, axis=0)
    return g.op("ReduceMean", probs, g.const([0, 1], np.int64), keepdims=0)


def output_hw(g, image):
    """(2,) int64: the image's (H, W), or the optional input `output_size` where it is set.
    test_model.py sets it when it decodes a JPEG at a reduced scale, so that the map goes
    from the network size straight to the original size, as on the PyTorch path."""
    L = np.int64
    hw = g.op("Slice", g.op("Shape", image), g.const([0], L), g.const([2], L))
    return g.op("Where", g.op("Greater", "output_size", g.const(0, L)), "output_size", hw)


def resize_back(g, prob, hw):
    """(h, w) -> (H, W): cv2.resize INTER_LINEAR (preprocess.prob_to_original)."""
    L = np.int64
    x = g.op("Unsqueeze", prob, g.const([0, 1], L))
    sizes = g.op("Concat", g.const([1, 1], L), hw, axis=0)
    big = g.op("Resize", x, "", "", sizes, mode="linear",
               coordinate_transformation_mode="half_pixel")
    return g.op("Squeeze", big, g.const([0, 1], L))


# ----------------------------------------------------------------------------- export

def export_network(net, size_hw, opset=OPSET):
    """The FPN as ONNX at its network size with a free batch dimension (for the views)."""
    import warnings
    x = torch.zeros(1, 3, *size_hw)
    batch = torch.export.Dim("views", min=1, max=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(net.eval(), (x,), dynamo=True, opset_version=opset,
                                    input_names=["x"], output_names=["logits"],
                                    dynamic_shapes=({0: batch},), verbose=False)
    return program.model_proto


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def member_record(ckpt, path):
    """A checkpoint without its weights, as the ONNX file keeps it (predict.OnnxPredictor
    reads it as it reads a checkpoint), with the source file's name and SHA-256."""
    return {"file": Path(path).name, "sha256": sha256(path), "settings": ckpt["settings"],
            "epoch": ckpt.get("epoch"), "valid_iou": ckpt.get("valid_iou"),
            "split_file": ckpt.get("split_file")}


def build(members, tta="none", threshold=None, opset=OPSET):
    """ONNX ModelProto of the whole way from image to mask for [(model, ckpt, path)]."""
    import onnx
    from onnx import TensorProto, helper

    if tta not in TTAS:
        raise SettingError(f"TTA={tta!r}: the ONNX graph holds {' or '.join(TTAS)}")
    threshold = float(members[0][1]["settings"]["threshold"] if threshold is None
                      else threshold)
    if not 0.0 < threshold < 1.0:
        raise SettingError(f"THRESHOLD={threshold} must lie strictly between 0 and 1")
    g = Graph()
    image = "image"
    groups = {}  # members sharing input settings: their mean commutes with the linear resize
    for index, (net, ckpt, _) in enumerate(members):
        settings = input_settings(ckpt)
        proto = export_network(net.cpu(), settings.size_hw, opset)
        prob = member_probability(g, proto, settings, image, tta, f"m{index}_")
        groups.setdefault(settings, []).append(prob)
    total, hw = None, output_hw(g, image)
    for probs in groups.values():
        mean = probs[0] if len(probs) == 1 else g.op("Mean", *probs)
        big = resize_back(g, mean, hw)
        part = g.op("Mul", big, g.const(np.float32(len(probs) / len(members))))
        total = part if total is None else g.op("Add", total, part)
    next(n for n in g.nodes if total in n.output).output[:] = ["probability"]  # no copy
    lesion = g.op("GreaterOrEqual", "probability", g.const(np.float32(threshold)))
    g.nodes.append(helper.make_node("Where", [lesion, g.const(np.uint8(255)),
                                              g.const(np.uint8(0))], ["mask"]))
    graph = helper.make_graph(
        g.nodes, "melanoma_fpn",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["height", "width", 3]),
         helper.make_tensor_value_info("output_size", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT,
                                       ["out_height", "out_width"]),
         helper.make_tensor_value_info("mask", TensorProto.UINT8, ["out_height", "out_width"])],
        g.inits + [onnx.numpy_helper.from_array(np.zeros(2, np.int64), "output_size")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="export_model.py")
    proto.ir_version = 10  # onnxruntime >= 1.20 reads it
    records = [member_record(ckpt, path) for _, ckpt, path in members]
    metadata = metadata_of(records, tta, threshold, opset)
    onnx.helper.set_model_props(proto, metadata)
    return proto


def metadata_of(records, tta, threshold, opset):
    runs = [r["settings"] for r in records]
    return {
        "format": predict.ONNX_FORMAT, "version": str(predict.ONNX_VERSION),
        "arch": ",".join(r["arch"] for r in runs),
        "encoder": ",".join(r["encoder"] for r in runs),
        "network_size": ",".join(f"{r['image_size'][0]}x{r['image_size'][1]}" for r in runs),
        "interpolation": ",".join(r["interpolation"] for r in runs),
        "mean": json.dumps([r["mean"] for r in runs]),
        "std": json.dumps([r["std"] for r in runs]),
        "threshold": repr(threshold), "tta": tta,
        "views": str(4 if tta == "flips" else 1),
        "recipe": json.dumps(runs),  # each member's settings
        "sources": json.dumps([{"file": r["file"], "sha256": r["sha256"]} for r in records]),
        "members": json.dumps(records), "opset": str(opset),
        "input": "image: uint8 (height, width, 3) RGB; optional output_size: int64 (2,), "
                 "the (height, width) of the outputs when not the image's own",
        "outputs": "probability: float32 (height, width); mask: uint8 (height, width) 0/255",
    }


# ----------------------------------------------------------------------------- checks

def torch_probability(members, image, tta="none", precision=(False, False)):
    """The PyTorch path of test_model.py from a decoded image (predict.decoded_probability) on
    the CPU. `precision`: (MIXED_PRECISION, CHANNELS_LAST), float32 by default, as the graph
    computes."""
    return predict.decoded_probability(members, image,
                                       device_lib.Compute(torch.device("cpu"), *precision), tta)


def check_image(hw, seed=0):
    """A smooth random RGB image with a dark blob: something for the network to react to."""
    import cv2
    rng = np.random.default_rng(seed)
    field = rng.integers(60, 220, (hw[0] // 16 + 2, hw[1] // 16 + 2, 3), dtype=np.uint8)
    image = cv2.resize(field, hw[::-1], interpolation=cv2.INTER_CUBIC)
    cv2.ellipse(image, (hw[1] // 2, hw[0] // 2), (hw[1] // 4, hw[0] // 5), 20, 0, 360,
                (90, 50, 40), -1)
    return image


def compare(session, members, tta, image):
    """(largest probability difference, share of mask pixels that differ) ONNX vs PyTorch."""
    prob, mask = session.run(None, {"image": image})
    ref = torch_probability(members, image, tta)
    threshold = float(json.loads(session.get_modelmeta().custom_metadata_map["threshold"]))
    ref_mask = preprocess.binarise(ref, threshold)
    return float(np.abs(prob - ref).max()), float(np.mean((mask > 0) != ref_mask))


# ----------------------------------------------------------------------------- command line

def info_lines(path):
    meta = predict.onnx_metadata(path)
    keys = ("arch", "encoder", "network_size", "interpolation", "mean", "std", "threshold", "tta",
            "views", "recipe", "opset", "input", "outputs")
    lines = [f"{path}: made by export_model.py (format {meta['format']} "
             f"version {meta['version']})"]
    lines += [f"  {key}: {meta[key]}" for key in keys if key in meta]
    for source in json.loads(meta["sources"]):
        lines.append(f"  source: {source['file']} sha256 {source['sha256']}")
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    settings_lib.add_flags(p, SETTINGS, globals())
    p.add_argument("--info", metavar="FILE.onnx", help="print what an exported file holds")
    return settings_lib.parse(p, SETTINGS, globals(), argv)[0]


def export(args):
    import onnx

    if any(str(p).lower().endswith(".onnx") for p in args.checkpoint or []):
        raise UsageError("--checkpoint takes the .pth checkpoint(s) an ONNX file "
                                    "is exported from; --info FILE.onnx shows an exported one")
    # traced on the CPU, in float32 and the default memory format, whatever inference here
    # runs in
    predictor = predict.load_predictor(args.checkpoint, args.model_dir,
                                       device_lib.Compute(torch.device("cpu")))
    members = [(net.to(memory_format=torch.contiguous_format), ckpt, path)
               for net, ckpt, path in predictor.members]
    out = Path(args.out) if args.out else Path(predictor.path).with_suffix(".onnx")
    proto = build(members, args.tta, args.threshold, args.opset)
    onnx.checker.check_model(proto, full_check=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        print(f"note: replacing {out}")
    with preprocess.atomic_write(out) as tmp:
        onnx.save_model(proto, str(tmp))
    session = predict.onnx_session(out)
    diff, share = compare(session, members, args.tta, check_image(args.check_size))
    for _, _, path in members:
        print(f"checkpoint: {path}")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, opset {args.opset}, views "
          f"{args.tta}); onnx.checker passed; onnxruntime vs PyTorch on a "
          f"{args.check_size[1]}x{args.check_size[0]} test image: largest probability difference "
          f"{diff:.1e}, {share:.3%} of mask pixels differ")
    print(f"use it: python test_model.py --checkpoint {out} --image IMAGE; from Python, "
          f"onnxruntime.InferenceSession('{out.name}').run(None, {{'image': rgb_uint8_hw3}}) "
          f"gives [probability, mask]; docs/deployment.md")
    return out


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.info:
            print("\n".join(info_lines(args.info)))
            return 0
        export(args)
        return 0
    except (UsageError, CheckpointError, SettingError) as exc:
        sys.exit(f"error: {exc}")
    except OSError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        sys.exit("\ninterrupted")


if __name__ == "__main__":
    sys.exit(main())
