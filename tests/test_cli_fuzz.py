"""Fuzzing at the command line: mutated safetensors headers, index.json files and GGUF headers fed to `nvdiag
inspect` and `nvdiag lint` end in exit 0, 1 or 2, never in an unhandled exception, and each run stays fast.

The reader-level fuzz tests (test_fuzz_readers.py) prove the readers raise only InputError; these go through the
layer model, format classification and every lint rule, which see values no valid file has.
Raise NVDIAG_FUZZ_EXAMPLES for a deeper run.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inspect_tools.cli import main
from inspect_tools.synthetic.bad_inputs import safetensors_bytes, write_valid_gguf

EXAMPLES = int(os.environ.get("NVDIAG_FUZZ_EXAMPLES", "25"))
# deadline: per example, both commands; a tiny file must never take seconds however it is broken.
FUZZ = settings(max_examples=EXAMPLES, deadline=3000, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

COMMANDS = (["inspect"], ["lint", "--format", "json"])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)


def run_all(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for command in COMMANDS:
        code = main([*command, str(path)])
        err = capsys.readouterr().err
        assert code in (0, 1, 2), (command, code, err)
        assert "Traceback" not in err
        if code == 2:
            assert len(err.strip().splitlines()) == 1, err


# --- safetensors headers of a real (tiny) NVFP4 mixed checkpoint ----------------------------------------------------

def split_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


@pytest.fixture(scope="module")
def nvfp4_parts(make_checkpoint) -> tuple[dict, bytes]:
    return split_safetensors(make_checkpoint("nvfp4-mixed", name="fuzz_nvfp4"))


@st.composite
def header_mutations(draw, header: dict) -> dict:
    """Change what a broken converter or a hostile author would: a field of a tensor entry (often a quantized
    layer's aux tensor), a tensor's name, a dropped tensor, or a metadata value."""
    header = json.loads(json.dumps(header))
    names = sorted(k for k in header if k != "__metadata__")
    aux = [n for n in names if n.rsplit(".", 1)[-1] in ("weight_scale", "weight_scale_2", "comfy_quant",
                                                         "input_scale")] or names
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["field", "field", "rename", "drop", "metadata", "dtype"]))
        name = draw(st.sampled_from(aux if draw(st.booleans()) else names))
        if name not in header:
            continue
        if action == "field":
            header[name][draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))] = draw(json_values)
        elif action == "dtype":
            header[name]["dtype"] = draw(st.sampled_from(["U8", "I8", "F8_E4M3", "F8_E5M2", "BF16", "F16", "F32",
                                                          "F64", "I64", "BOOL", "F4", "F8_E8M0"]))
        elif action == "rename":
            suffix = draw(st.sampled_from(["weight", "weight_scale", "weight_scale_2", "comfy_quant", "input_scale",
                                           "bias", "scaled_fp8", ""]))
            new = name.rsplit(".", 1)[0] + ("." + suffix if suffix else "")
            header[new] = header.pop(name)
        elif action == "drop":
            del header[name]
        else:
            meta = header.setdefault("__metadata__", {})
            meta[draw(st.sampled_from(["_quantization_metadata", "format", "nvdiag"]))] = draw(
                st.text(max_size=12) | json_values.map(json.dumps))
    return header


@FUZZ
@given(data=st.data())
def test_mutated_nvfp4_header(tmp_path: Path, nvfp4_parts, data, capsys):
    header, body = nvfp4_parts
    mutated = data.draw(header_mutations(header))
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_bytes(json.dumps(mutated).encode(), body))
    run_all(path, capsys)


@FUZZ
@given(data=st.data())
def test_mutated_safetensors_bytes(tmp_path: Path, nvfp4_parts, data, capsys):
    """Raw byte damage inside the header (the data section is covered by the readers' own fuzz test)."""
    header, body = nvfp4_parts
    raw = bytearray(safetensors_bytes(header, body))
    (length,) = struct.unpack("<Q", raw[:8])
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, 8 + length - 1))
        raw[position] = data.draw(st.integers(0, 255))
    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes(raw))
    run_all(path, capsys)


# --- index.json of a sharded checkpoint -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sharded(make_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A private copy of a 2-shard checkpoint (the index is rewritten by every example) and its index document."""
    index = make_checkpoint("float", sharded=2, name="fuzz_sharded")
    folder = tmp_path_factory.mktemp("fuzz_sharded")
    for shard in index.parent.iterdir():
        shutil.copy(shard, folder / shard.name)
    return folder / index.name, json.loads(index.read_text())


@st.composite
def index_mutations(draw, document: dict) -> bytes:
    document = json.loads(json.dumps(document))
    weight_map = document["weight_map"]
    names = sorted(weight_map)
    shards = sorted(set(weight_map.values()))
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["value", "shard", "path", "drop", "add", "top", "bytes"]))
        name = draw(st.sampled_from(names))
        if action == "value" and name in weight_map:
            weight_map[name] = draw(json_values)
        elif action == "shard" and name in weight_map:
            weight_map[name] = draw(st.sampled_from(shards))  # the tensor is in the other shard (or still here)
        elif action == "path" and name in weight_map:
            weight_map[name] = draw(st.sampled_from(["../" + shards[0], "/etc/passwd", ".", "", "sub/" + shards[0],
                                                     shards[0] + "\x00", "C:\\x.safetensors"]))
        elif action == "drop":
            weight_map.pop(name, None)
        elif action == "add":
            weight_map[draw(st.text(max_size=10))] = draw(st.sampled_from(shards))
        elif action == "top":
            document[draw(st.sampled_from(["weight_map", "metadata"]))] = draw(json_values)
    raw = bytearray(json.dumps(document).encode())
    if draw(st.booleans()) and raw:
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    return bytes(raw)


@FUZZ
@given(data=st.data())
def test_mutated_index_json(sharded, data, capsys):
    index, document = sharded
    index.write_bytes(data.draw(index_mutations(document)))
    run_all(index, capsys)


# --- GGUF headers ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return write_valid_gguf(tmp_path_factory.mktemp("fuzz_gguf") / "base.gguf").read_bytes()


# Magic, version, counts, then key-value and tensor-info records: the structure lives in the first few hundred bytes.
GGUF_HEADER_BYTES = 400


@FUZZ
@given(data=st.data())
def test_mutated_gguf_header(tmp_path: Path, gguf_bytes: bytes, data, capsys):
    raw = bytearray(gguf_bytes)
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, min(GGUF_HEADER_BYTES, len(raw)) - 1))
        if data.draw(st.booleans()):
            raw[position] = data.draw(st.integers(0, 255))
        else:  # a plausible-looking but wrong 64-bit count, length or offset
            raw[position:position + 8] = struct.pack("<Q", data.draw(st.sampled_from(
                [0, 1, 2**31, 2**32 + 1, 2**63, 2**64 - 1])))
    path = tmp_path / "model.gguf"
    path.write_bytes(bytes(raw))
    run_all(path, capsys)


# --- files a user writes by hand: preset TOML and --input-scales JSON, through `nvdiag convert` -----------------------

@pytest.fixture(scope="module")
def float_source(make_checkpoint) -> tuple[Path, list[str]]:
    """A tiny float WAN checkpoint and the ComfyUI names of its layers (what a scales file names)."""
    from inspect_tools.layers import open_model

    path = make_checkpoint("float", name="fuzz_float")
    with open_model(path) as model:
        return path, sorted(layer.native_name or layer.name for layer in model.layers.values())


def run_convert(argv_tail: list[str], src: Path, out_dir: Path, capsys: pytest.CaptureFixture[str]) -> int:
    """convert SRC into an empty folder: exit 0, 1 or 2, never a traceback; on exit 2 one line and nothing written.

    The plan (--dry-run) reads and checks everything a hand-written file gives; a file it refuses is also given to a
    real run, which must refuse it the same way. A file it accepts is not converted: writing is tested elsewhere, and
    quantizing the whole model per example would make the fuzz run minutes long."""
    out = out_dir / "out.safetensors"
    code = None
    for extra in (["--dry-run"], []):
        code = main(["convert", str(src), str(out), *argv_tail, *extra])
        err = capsys.readouterr().err
        assert code in (0, 1, 2), (code, err)
        assert "Traceback" not in err
        if code != 2:
            break
        assert len(err.strip().splitlines()) == 1, err
        assert list(out_dir.iterdir()) == [], "a refused run left a file"
    return code


# Values a hand-written file may hold where a number is expected: huge, negative, non-finite, of the wrong type, deep.
numbers = (st.integers(-(2**70), 2**70) | st.sampled_from([0, -1, 1, 2**16, 2**16 + 1, 2**63 - 1, 10**400])
           | st.floats(allow_nan=True, allow_infinity=True))
toml_leaves = numbers | st.booleans() | st.text(max_size=8)
toml_values = st.recursive(toml_leaves, lambda children: st.lists(children, max_size=3)
                           | st.dictionaries(st.text(max_size=4), children, max_size=2), max_leaves=5)


def toml_value(value: object) -> str:
    """A value in TOML syntax (what a user might type; floats past TOML's range come out as inf/nan)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if value != value else ("inf" if value == float("inf") else "-inf" if value == -float("inf")
                                             else repr(value))
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


RULE_KEYS = ["match", "regex", "format", "reason", "full_precision_matrix_mult", "linear", "in_blocks", "sensitive",
             "ndim", "min_dim", "divisible_by", "max_numel"]


@st.composite
def preset_texts(draw) -> bytes:
    """A preset of a few rules whose values are drawn from anything TOML can hold, sometimes nested deep or damaged."""
    lines = [f"name = {toml_value(draw(st.text(max_size=6)))}",
             f"default = {toml_value(draw(st.sampled_from(['keep', 'bf16', 'f32', 'nvfp4', 1])))}"]
    for _ in range(draw(st.integers(0, 3))):
        lines.append("[[rules]]")
        lines.append(f"format = {toml_value(draw(st.sampled_from(['nvfp4', 'fp8', 'keep', 'nvfp4-w4a16', 'x'])))}")
        for key in draw(st.lists(st.sampled_from(RULE_KEYS), max_size=3, unique=True)):
            if key != "format":
                value = draw(st.sampled_from(["*", "blocks.*", "^blocks\\.\\d+\\."]) | toml_values)
                lines.append(f"{key} = {toml_value(value)}")
    if draw(st.booleans()):
        depth = draw(st.sampled_from([40, 1000, 5000]))
        lines.insert(0, f"deep = {'[' * depth}{']' * depth}")
    raw = bytearray("\n".join(lines).encode() + b"\n")
    if draw(st.booleans()):
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    return bytes(raw)


HAND_WRITTEN_FUZZ = settings(FUZZ, deadline=5000)  # two runs per example; a refusal must come fast however bad


@HAND_WRITTEN_FUZZ
@given(text=preset_texts())
def test_fuzzed_preset_toml(tmp_path_factory, float_source, text: bytes, capsys):
    folder = tmp_path_factory.mktemp("fuzz_preset")
    preset = folder / "preset.toml"
    preset.write_bytes(text)
    out_dir = folder / "out"
    out_dir.mkdir()
    run_convert(["--preset", str(preset)], float_source[0], out_dir, capsys)
    assert preset.read_bytes() == text  # inputs are never modified


@st.composite
def input_scales_texts(draw, layers: list[str]) -> bytes:
    """{layer: value} with real and made-up names and any JSON value; sometimes another top level, deep, or damaged."""
    name = st.sampled_from(layers) | st.sampled_from(layers).map(lambda n: n + ".input_scale") | st.text(max_size=8)
    scale = numbers | json_values | st.floats(1e-6, 10) | st.lists(st.floats(1e-6, 10), min_size=1, max_size=2)
    document: object = draw(st.dictionaries(name, scale, max_size=4))
    if draw(st.integers(0, 5)) == 0:
        document = draw(json_values)
    text = json.dumps(document)  # NaN and Infinity as Python's json writes them
    if draw(st.integers(0, 5)) == 0:
        depth = draw(st.sampled_from([100, 10_000]))
        text = f'{{"{layers[0]}": {"[" * depth}{"]" * depth}}}'
    raw = bytearray(text.encode())
    if draw(st.integers(0, 3)) == 0 and raw:
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    return bytes(raw)


@HAND_WRITTEN_FUZZ
@given(data=st.data())
def test_fuzzed_input_scales_json(tmp_path_factory, float_source, data, capsys):
    src, layers = float_source
    text = data.draw(input_scales_texts(layers))
    folder = tmp_path_factory.mktemp("fuzz_scales")
    scales = folder / "scales.json"
    scales.write_bytes(text)
    out_dir = folder / "out"
    out_dir.mkdir()
    run_convert(["--preset", "smart", "--input-scales", str(scales)], src, out_dir, capsys)
    assert scales.read_bytes() == text
# --- GGUF tensor-info tables and marker JSON, through the whole command ---------------------------------------------

WEIRD_U64 = st.sampled_from([0, 1, 31, 32, 33, 256, 2**32, 2**62, 2**63, 2**64 - 1]) | st.integers(0, 600)


@FUZZ
@given(tensors=st.lists(st.tuples(st.sampled_from(["blocks.0.ffn.0.weight", "blocks.0.ffn.0.bias", "a\nb", "\x1b[1m",
                                                   ""]),
                                  st.sampled_from([0, 1, 2, 8, 12, 14, 99]),
                                  st.lists(WEIRD_U64, max_size=4).map(tuple), WEIRD_U64), max_size=4),
       data_size=st.integers(0, 2048), declared=st.sampled_from([None, 0, 1, 9]))
def test_random_gguf_tensor_table(tmp_path: Path, tensors, data_size: int, declared, capsys):
    from inspect_tools.synthetic.bad_inputs import gguf_bytes

    path = tmp_path / "model.gguf"
    path.write_bytes(gguf_bytes(tensors, bytes(data_size), tensor_count=declared))
    run_all(path, capsys)


@FUZZ
@given(marker=st.sampled_from(['{"format": ', '{"format": "nvfp4", "x": ', "[", '{"a": ']).flatmap(
           lambda head: st.integers(0, 5000).map(lambda n: head + "[" * n + "]" * n + ("}" if "{" in head else "")))
       | json_values.map(lambda v: json.dumps({"format": v}))
       | st.integers(4000, 5000).map(lambda n: '{"format": "nvfp4", "n": ' + "7" * n + "}"),
       where=st.sampled_from(["tensor", "metadata"]))
def test_random_marker_json(tmp_path: Path, marker: str, where: str, capsys):
    """A .comfy_quant tensor or a _quantization_metadata entry of any shape: a finding at worst, never a crash."""
    from inspect_tools.synthetic.bad_inputs import LAYER, nvfp4_layer

    if where == "tensor":
        path = nvfp4_layer(tmp_path / "m", marker=marker.encode())
    else:
        layers = '{"format_version": "1.0", "layers": {"' + LAYER + '": ' + marker + "}}"
        path = nvfp4_layer(tmp_path / "m", marker=None, metadata={"_quantization_metadata": layers})
    run_all(path, capsys)
