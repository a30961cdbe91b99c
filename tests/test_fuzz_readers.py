"""Fuzzing: random mutations and truncations of small valid files either open (and load) or raise InputError."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inspect_tools.errors import InputError
from inspect_tools.readers import open_checkpoint
from inspect_tools.synthetic.bad_inputs import two_tensor_header, valid_safetensors_bytes, write_valid_gguf

# Small by default so the suite stays fast on 2 cores; raise NVDIAG_FUZZ_EXAMPLES for a deeper run.
FUZZ = settings(max_examples=int(os.environ.get("NVDIAG_FUZZ_EXAMPLES", "60")), deadline=2000,
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
