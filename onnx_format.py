"""The ONNX file export_model.py writes and test_model.py reads: its metadata, writer and reader
side by side, with the format's version.

A file's graph takes `image`, uint8 (height, width, 3) RGB, and an optional `output_size`,
int64 (2,), and returns `probability`, float32, and `mask`, uint8 0/255, at the image's size
(or at output_size). Its metadata (string key -> string value) says what it holds:

    format, version       FORMAT, VERSION
    arch, encoder, network_size, interpolation, mean, std    per member, comma-separated
                          (mean and std as JSON lists)
    threshold, tta, views the mask's cut and the test-time views inside the graph
    recipe, members       each member's settings record, and its checkpoint without weights
    sources               each member's checkpoint file name and SHA-256
    opset, input, outputs the graph's opset and interface, in words
    resize                (version 3) how the graph resizes the image to the network size
    precision             (version 3) "float32", or "int8" (static QDQ quantisation)
    int8_check            (version 3, int8 files) the measured difference from the float32
                          graph, as JSON

Every version since 2 keeps loading: `read_metadata` brings an older file's metadata up to
this version one step at a time (MIGRATIONS), as checkpoints are. The graph of an older file
runs as it was written.
"""
import copy
import hashlib
import json
from pathlib import Path

import numpy as np

from checkpoint import CheckpointError

FORMAT = "melanoma-fpn-onnx"  # the marker in the file's metadata
VERSION = 3
# what the readers need from an exported file's metadata, at VERSION
KEYS = ("format", "version", "arch", "encoder", "network_size", "interpolation", "mean", "std",
        "threshold", "tta", "views", "recipe", "sources", "members", "opset", "resize",
        "precision")
# the graph's resize to the network size, by version 3's `resize` value
RESIZE_ANTIALIAS = "onnx Resize linear antialias=1 exclude_outside=1 (float, rounded)"
RESIZE_OPENCV = "OpenCV area (shrink) / linear (enlarge), written out of ONNX operators"


class FormatError(CheckpointError):
    """A file that is not a usable export of this project; the message says why."""


# ----------------------------------------------------------------------------- writing

def metadata(records, tta, threshold, opset, precision="float32"):
    """The metadata of a graph of the members `records` (each a checkpoint without its
    weights, with its source "file" and "sha256"), at VERSION."""
    runs = [r["settings"] for r in records]
    return {
        "format": FORMAT, "version": str(VERSION),
        "arch": ",".join(r["arch"] for r in runs),
        "encoder": ",".join(r["encoder"] for r in runs),
        "network_size": ",".join(f"{r['image_size'][0]}x{r['image_size'][1]}" for r in runs),
        "interpolation": ",".join(r["interpolation"] for r in runs),
        "mean": json.dumps([r["mean"] for r in runs]),
        "std": json.dumps([r["std"] for r in runs]),
        "threshold": repr(float(threshold)), "tta": tta, "views": str(views_of(tta)),
        "recipe": json.dumps(runs),
        "sources": json.dumps([{"file": r["file"], "sha256": r["sha256"]} for r in records]),
        "members": json.dumps(records), "opset": str(opset),
        "input": "image: uint8 (height, width, 3) RGB; optional output_size: int64 (2,), "
                 "the (height, width) of the outputs when not the image's own",
        "outputs": "probability: float32 (height, width); mask: uint8 (height, width) 0/255",
        "resize": RESIZE_ANTIALIAS, "precision": precision,
    }


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


def views_of(tta):
    return {"none": 1, "flips": 4, "flips+rot90": 8}[tta]


def set_metadata(proto, meta):
    """Replace the metadata of an onnx ModelProto."""
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)


def add_output_size(proto):
    """Add the optional input `output_size` (int64 (2,), zeros: the image's own size) and let
    it set the size of the resize back (test_model.py gives the size in a JPEG's header when
    it decodes the JPEG at a reduced scale, as the PyTorch path does). The resizes back are
    the Resize nodes whose size is computed from the image's (every other one, inside the
    networks or to the network size, has a constant size)."""
    from onnx import TensorProto, helper, numpy_helper

    fixed = {i.name for i in proto.graph.initializer} | {
        out for n in proto.graph.node if n.op_type == "Constant" for out in n.output}
    back = [n for n in proto.graph.node if n.op_type == "Resize" and len(n.input) > 3
            and n.input[3] and n.input[3] not in fixed]
    if not back:
        raise FormatError("the traced graph has no resize back to the image's size")
    proto.graph.initializer.extend([
        numpy_helper.from_array(np.zeros(2, np.int64), "output_size"),
        numpy_helper.from_array(np.ones(2, np.int64), "output_size_lead"),
        numpy_helper.from_array(np.int64(0), "output_size_zero")])
    proto.graph.input.append(helper.make_tensor_value_info("output_size", TensorProto.INT64, [2]))
    given = [helper.make_node("ReduceMax", ["output_size"], ["output_size_max"], keepdims=0),
             helper.make_node("Greater", ["output_size_max", "output_size_zero"],
                              ["output_size_given"]),
             helper.make_node("Concat", ["output_size_lead", "output_size"],
                              ["output_size_sizes"], axis=0)]
    back_outputs = {n.output[0] for n in back}
    nodes = given
    for node in proto.graph.node:  # each choice just before its Resize, in graph order
        node = copy.deepcopy(node)
        if node.output[0] in back_outputs:
            chosen = f"output_size_chosen_{len(nodes)}"
            nodes.append(helper.make_node("Where", ["output_size_given", "output_size_sizes",
                                                    node.input[3]], [chosen]))
            node.input[3] = chosen
        nodes.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)


def constant_values(graph):
    """{name: array} of a graph's initializers and Constant nodes' values."""
    from onnx import numpy_helper

    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    values.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                   if n.op_type == "Constant" and n.attribute[0].name == "value"})
    return values


def planar_resizes_back(proto):
    """Each resize back to the image's size whose (1, 1, height, width) result is squeezed to
    (height, width) resizes the squeezed network-size map instead: the same values, written
    straight into the output, where onnxruntime copied the full-size map once more (4 of the
    30 ms of the CPU recipe's int8 graph on a 3008x2000 image). Returns how many."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    readers, values = {}, constant_values(graph)
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    def squeeze_of(name, axis):  # the one reader of `name`, a Squeeze of `axis` alone
        nodes = readers.get(name, [])
        return nodes[0] if len(nodes) == 1 and nodes[0].op_type == "Squeeze" and len(
            nodes[0].input) == 2 and values.get(nodes[0].input[1], np.array([])).tolist() \
            == [axis] else None
    done, gone = [], set()  # gone: the full-size maps no longer made
    for resize in [n for n in graph.node if n.op_type == "Resize" and len(n.input) == 4
                   and not any(n.input[1:3]) and n.input[3] not in values]:
        first = squeeze_of(resize.output[0], 1)
        second = first and squeeze_of(first.output[0], 0)
        if second and resize.name and first.name and second.name:
            done.append((resize, first, second))
            gone |= {resize.output[0], first.output[0]}
    squeezes = {n.name for _, first, second in done for n in (first, second)}
    final = {resize.name: second.output[0] for resize, _, second in done}
    nodes = []
    for node in graph.node:
        if node.name in squeezes:
            continue
        node = copy.deepcopy(node)
        if node.name in final:
            stem = node.name
            graph.initializer.extend([
                numpy_helper.from_array(np.array(v, np.int64), f"{stem}_{k}")
                for k, v in (("axes", [0, 1]), ("from", [2]), ("to", [4]))])
            nodes += [helper.make_node("Squeeze", [node.input[0], f"{stem}_axes"],
                                       [f"{stem}_planar_map"]),
                      helper.make_node("Slice", [node.input[3], f"{stem}_from", f"{stem}_to"],
                                       [f"{stem}_planar_size"])]
            node.input[0], node.input[3] = f"{stem}_planar_map", f"{stem}_planar_size"
            node.output[0] = final[stem]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [v for v in graph.value_info if v.name not in gone]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return len(done)


def global_pools(proto):
    """Each ReduceMean over the two spatial axes of a 4-D tensor, keeping them, becomes the
    GlobalAveragePool it equals (the squeeze of a squeeze-and-excitation block, which
    torch.onnx writes as a ReduceMean): onnxruntime runs GlobalAveragePool in its channels-last
    int8 kernels, where the float ReduceMeans took 30 of the 228 ms of se_resnext50_32x4d's
    int8 graph (docs/speed.md). Returns how many were replaced."""
    from onnx import helper

    graph = proto.graph
    values = constant_values(graph)
    ranks = {v.name: len(v.type.tensor_type.shape.dim)
             for v in list(graph.value_info) + list(graph.input)}
    replaced = 0
    for i, node in enumerate(graph.node):
        keep = {a.name: a.i for a in node.attribute}.get("keepdims", 1)
        if node.op_type != "ReduceMean" or len(node.input) != 2 or not keep \
                or ranks.get(node.input[0]) != 4 or node.input[1] not in values:
            continue
        if sorted(int(a) % 4 for a in values[node.input[1]].ravel()) == [2, 3]:
            graph.node[i].CopyFrom(helper.make_node("GlobalAveragePool", node.input[:1],
                                                    node.output, name=node.name))
            replaced += 1
    return replaced


# ----------------------------------------------------------------------------- reading

def from_version_2(meta):
    """Version 2 (up to the hand-built OpenCV resize) -> 3: the same keys, plus how the
    graph resizes and its precision (always float32 then)."""
    return {**meta, "version": "3", "resize": RESIZE_OPENCV, "precision": "float32"}


MIGRATIONS = {2: from_version_2}  # version -> the step that brings it to version + 1


def migrate(meta, path="file"):
    """Metadata of any version from 2 on, brought up to VERSION one step at a time."""
    version = meta.get("version", "")
    if meta.get("format") != FORMAT or not version.isdigit():
        raise FormatError(f"{path} has format {meta.get('format')!r} version {version!r}, "
                          f"not {FORMAT!r}")
    version = int(version)
    if version > VERSION or (version < VERSION and version not in MIGRATIONS):
        raise FormatError(f"{path} has version {version} of {FORMAT!r}; this code reads "
                          f"versions {min(MIGRATIONS)} to {VERSION}: "
                          + ("update the project" if version > VERSION else
                             "export it again with `python export_model.py`"))
    while version < VERSION:
        meta, version = MIGRATIONS[version](meta), version + 1
    return meta


def interface_lacks(proto):
    """What of the graph's interface an exported file must have is missing."""
    import onnx

    inputs = {i.name: i.type.tensor_type for i in proto.graph.input}
    outputs = {o.name for o in proto.graph.output}
    lacks = []
    if "image" not in inputs or inputs["image"].elem_type != onnx.TensorProto.UINT8 \
            or len(inputs["image"].shape.dim) != 3:
        lacks.append("an input 'image' of uint8 (height, width, 3)")
    return lacks + [f"an output '{name}'" for name in ("probability", "mask")
                    if name not in outputs]


def read_metadata(path):
    """The metadata of a file written by export_model.py (any version from 2), at VERSION;
    FormatError says what is wrong with any other file."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FormatError(f"no ONNX file at {path}: write one with `python export_model.py "
                          f"--checkpoint MODEL.pth`")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise FormatError(f"{path} is not a readable ONNX file "
                          f"({exc.__class__.__name__})") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    needed = KEYS[:15]  # the keys of every version from 2 on
    lacks = [f"metadata '{k}'" for k in needed if k not in meta] + interface_lacks(proto)
    if lacks:
        raise FormatError(f"{path} was not made by export_model.py: it lacks "
                          f"{', '.join(lacks)}")
    return migrate(meta, path)


def session(path, threads=1):
    """An onnxruntime CPU session of an exported file, its warnings hidden (among them the
    note that the optional input output_size can be overridden, as it is meant to be)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------- int8

# quantised where onnxruntime fuses them into integer kernels; Resize (a Q/DQ pair around a
# linear Resize has given wrong results in onnxruntime) and Sigmoid stay float
INT8_OPS = ["Conv", "Relu", "Add", "Mul", "MaxPool", "GlobalAveragePool", "Concat"]


def float_nodes(proto_path):
    """The nodes kept in float beyond the op types: everything up to and including the first
    convolution (the resize to the network size, the normalisation, the image's first
    features) and from the last convolution on (the logits, the sigmoid, the means, the
    resize back, the threshold), where int8 steps would cost accuracy most; the producer of
    each linear Resize's input (a decoder's upsampling), so that the Resize reads float and no
    Q/DQ pair wraps it (its output is quantised for the convolution that reads it); and each
    grouped convolution with the ReLU before and after it: onnxruntime 1.32's int8 grouped
    convolution (4 to 32 channels a group in se_resnext50_32x4d) took over twice its float time,
    and with a float ReLU on either side its WeightBiasQuantization step does not turn the
    convolution into int8 again when the file is loaded (docs/speed.md)."""
    import onnx
    nodes = onnx.load(str(proto_path)).graph.node
    convs = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    linear = {n.input[0] for n in nodes if n.op_type == "Resize" and any(
        a.name == "mode" and a.s == b"linear" for a in n.attribute)}
    grouped = [n for n in nodes if n.op_type == "Conv" and any(
        a.name == "group" and a.i > 1 for a in n.attribute)]
    around = {n.input[0] for n in grouped} | {n.output[0] for n in grouped}
    beside = [n.name for n in nodes if n.op_type == "Relu"
              and (n.output[0] in around or n.input[0] in around)]
    return [n.name for i, n in enumerate(nodes)
            if i <= convs[0] or i >= convs[-1] or linear & set(n.output)] \
        + [n.name for n in grouped] + beside


def quantise(float_path, out, images):
    """Static QDQ quantisation (per-channel int8 weights, uint8 activations) of the network
    inside an exported file, after onnxruntime's quant_pre_process, calibrated (min/max) on
    `images`, uint8 (H, W, 3) each. The steps outside the network, the Resize nodes and the
    sigmoid stay float32, as onnxruntime's documentation advises. Signed activations (S8S8,
    the documentation's first choice) were tried first: onnxruntime 1.32 left most 1x1
    convolutions of se_resnext50_32x4d unfused, in float, and the graph ran no faster than
    float32 (450 against 430 ms); with uint8 activations (U8S8) it took 158 ms
    (docs/deployment.md)."""
    from onnxruntime import quantization as q

    class Images(q.CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"image": image} for image in images])

        def get_next(self):
            return next(self.feeds, None)
    prepared = Path(out).with_suffix(".prep.onnx")
    q.quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
    try:
        q.quantize_static(str(prepared), str(out), Images(), quant_format=q.QuantFormat.QDQ,
                          per_channel=True, activation_type=q.QuantType.QUInt8,
                          weight_type=q.QuantType.QInt8, op_types_to_quantize=INT8_OPS,
                          nodes_to_exclude=float_nodes(prepared))
    finally:
        prepared.unlink(missing_ok=True)
