"""Fuzzing: random mutations and truncations of small valid files either open (and load) or raise InputError."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from inspect_tools.errors import InputError
from inspect_tools.readers import open_checkpoint
from inspect_tools.synthetic.bad_inputs import two_tensor_header, valid_safetensors_bytes, write_valid_gguf

# Small by default so the suite stays fast on 2 cores; raise NVDIAG_FUZZ_EXAMPLES for a deeper run. The same
# examples every run (CI must not turn red on a case no change brought in); NVDIAG_FUZZ_EXPLORE=1 draws new ones, and
# what they find is kept as an @example.
FUZZ = settings(max_examples=int(os.environ.get("NVDIAG_FUZZ_EXAMPLES", "60")), deadline=2000,
                derandomize=not os.environ.get("NVDIAG_FUZZ_EXPLORE"),
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def open_and_load_all(path: Path) -> None:
    """What any command does with a checkpoint: open it, then load every tensor (raw and as float)."""
    try:
        with open_checkpoint(path) as reader:
            for name in reader.names():
                reader.load(name)
                try:
                    reader.load_float(name)
                except InputError:
                    pass  # a dtype with no float form is reported, not crashed on
    except InputError as exc:
        assert "\n" not in str(exc)


@st.composite
def mutations(draw, base: bytes) -> bytes:
    """Flip a few bytes, insert or delete a run, or truncate: the corruptions a download or a bad tool makes."""
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        position = draw(st.integers(0, max(0, len(data) - 1)))
        if action == "flip" and data:
            data[position] = draw(st.integers(0, 255))
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete":
            del data[position:position + draw(st.integers(1, 8))]
        else:
            del data[position:]
    return bytes(data)


@pytest.fixture(scope="module")
def gguf_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        return write_valid_gguf(Path(folder) / "base.gguf").read_bytes()


SAFETENSORS = valid_safetensors_bytes()


@FUZZ
@given(data=mutations(SAFETENSORS))
def test_mutated_safetensors(tmp_path: Path, data: bytes):
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    open_and_load_all(path)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)


@FUZZ
@given(field=st.sampled_from(["dtype", "shape", "data_offsets", "extra"]), value=json_values,
       tensor=st.sampled_from(["a.weight", "a.bias", "__metadata__"]))
def test_safetensors_header_with_random_json_values(tmp_path: Path, field: str, tensor: str, value):
    header = two_tensor_header()
    if tensor == "__metadata__":
        header[tensor] = {field: value}
    else:
        header[tensor][field] = value
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "model.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + SAFETENSORS[-48:])
    open_and_load_all(path)


@FUZZ
@given(weight_map=json_values | st.dictionaries(st.sampled_from(["a", "b", "x"]),
                                                  st.sampled_from(["s1.safetensors", "s2.safetensors", "../s1",
                                                                   "/etc/passwd", "", "s1.safetensors/"]) | json_values,
                                                  max_size=3),
       extra=st.dictionaries(st.sampled_from(["metadata", "weight_map"]), json_values, max_size=1))
def test_random_index_json(tmp_path: Path, weight_map, extra):
    folder = tmp_path / "ckpt"
    folder.mkdir(exist_ok=True)
    (folder / "s1.safetensors").write_bytes(SAFETENSORS)
    index = {"weight_map": weight_map, **extra}
    path = folder / "model.safetensors.index.json"
    path.write_text(json.dumps(index))
    open_and_load_all(path)


@FUZZ
@given(data=st.data())
def test_mutated_gguf(tmp_path: Path, gguf_bytes: bytes, data):
    path = tmp_path / "model.gguf"
    path.write_bytes(data.draw(mutations(gguf_bytes)))
    open_and_load_all(path)


@FUZZ
@given(data=st.data())
def test_mutated_gguf_header_region(tmp_path: Path, gguf_bytes: bytes, data):
    """Most GGUF bytes are tensor data; aim the corruption at the header, where the parser's loops are."""
    header_end = 200
    head = data.draw(mutations(gguf_bytes[:header_end]))
    path = tmp_path / "model.gguf"
    path.write_bytes(head + gguf_bytes[header_end:])
    open_and_load_all(path)


# --- marker and metadata JSON ---------------------------------------------------------------------------------------

@st.composite
def json_texts(draw) -> str:
    """JSON-ish text: valid documents, deep nests, long integers, brackets inside strings, and truncations."""
    kind = draw(st.sampled_from(["value", "deep", "integer", "format", "garbage"]))
    if kind == "value":
        text = json.dumps({"format": draw(json_values), **draw(st.dictionaries(st.text(max_size=4), json_values,
                                                                                max_size=2))})
    elif kind == "deep":
        depth = draw(st.integers(1, 3000))
        open_, close = draw(st.sampled_from([("[", "]"), ('{"a":', "}"), ('["[",', "]")]))
        text = open_ * depth + draw(st.sampled_from(["1", '"x"', "[]", ""])) + close * depth
    elif kind == "integer":
        text = '{"format": "nvfp4", "n": ' + draw(st.sampled_from(["-", ""])) + "9" * draw(st.integers(1, 6000)) + "}"
    elif kind == "format":
        text = json.dumps({"format": draw(json_values)})
    else:
        text = draw(st.text(alphabet='[]{}",:0123456789.eE-\\ab ', max_size=60))
    if draw(st.booleans()) and text:
        text = text[: draw(st.integers(0, len(text)))]
    return text


@FUZZ
@given(text=json_texts())
def test_marker_and_metadata_json_never_raise_beyond_their_contract(text: str):
    """decode_marker_bytes: a conf whose format is a string (or absent, or null), or ValueError; parse_quant_metadata: a
    parsed document or a one-line error, never an exception."""
    from inspect_tools.layers import decode_marker_bytes, parse_quant_metadata

    try:
        conf = decode_marker_bytes(text.encode())
        assert isinstance(conf, dict) and isinstance(conf.get("format") or "", str)
    except ValueError as exc:
        assert "\n" not in str(exc)
    parsed, error = parse_quant_metadata({"_quantization_metadata": text})
    assert (parsed is None) != (error is None)
    assert error is None or "\n" not in error


# --- GGUF tensor-info table -----------------------------------------------------------------------------------------

# Values that break arithmetic: zero, one, block sizes and their neighbours, 32-bit and 64-bit edges.
WEIRD_U64 = st.sampled_from([0, 1, 2, 4, 31, 32, 33, 255, 256, 257, 2**31, 2**32, 2**32 + 1, 2**62, 2**63, 2**64 - 1])


@st.composite
def tensor_tables(draw) -> tuple[list, int]:
    """Tensor infos (name, GGML type id, dims, offset) as a broken writer or a hostile author would lay them out,
    and the size of the data section."""
    tensors = []
    for index in range(draw(st.integers(0, 5))):
        name = draw(st.sampled_from([f"blocks.{index}.weight", "blocks.0.weight", ""]) | st.binary(max_size=8))
        ggml_type = draw(st.sampled_from([0, 1, 2, 8, 12, 14, 30, 39, 2**32 - 1]) | st.integers(0, 50))
        dims = tuple(draw(st.lists(WEIRD_U64 | st.integers(0, 600), max_size=5)))
        offset = draw(WEIRD_U64 | st.sampled_from([64 * index, 512 * index, 3]))
        tensors.append((name, ggml_type, dims, offset))
    return tensors, draw(st.integers(0, 4096))


@FUZZ
@given(table=tensor_tables(), declared=st.sampled_from([None, 0, 1, 7]))
@example(table=([("blocks.0.weight", 0, (0,), 0)], 0), declared=None)  # an empty F32 tensor (found by the fuzzer)
@example(table=([("blocks.0.weight", 2, (0,), 0)], 0), declared=None)  # an empty Q4_0 tensor (found by the fuzzer)
def test_gguf_tensor_info_table(tmp_path: Path, table, declared):
    from inspect_tools.synthetic.bad_inputs import gguf_bytes

    tensors, data_size = table
    path = tmp_path / "model.gguf"
    path.write_bytes(gguf_bytes(tensors, bytes(data_size), tensor_count=declared))
    open_and_load_all(path)
