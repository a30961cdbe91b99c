"""Readers on good files: single, sharded and GGUF checkpoints open lazily and load what was written."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from inspect_tools.errors import InputError
from inspect_tools.readers import open_checkpoint

ALL_TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}


def sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    values = torch.linspace(-3, 3, int(np.prod(shape)) or 1)[: int(np.prod(shape))].reshape(shape)
    if dtype == torch.bool:
        return values > 0
    if not dtype.is_floating_point:
        return values.abs().round().to(dtype)
    return values.to(dtype)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def every_dtype(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = {f"t.{name.lower()}": sample(dtype, (3, 4)) for name, dtype in ALL_TORCH_DTYPES.items()}
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.zeros(0, 8)
    path = tmp_path / "model.safetensors"
    save_file(tensors, path, metadata={"source": "test"})
    return path, tensors


def test_single_file_reports_header_and_loads_every_dtype(every_dtype):
    path, tensors = every_dtype
    before = digest(path)
    with open_checkpoint(path) as reader:
        assert reader.kind == "safetensors"
        assert reader.metadata == {"source": "test"}
        assert set(reader.names()) == set(tensors)
        for name, expected in tensors.items():
            info = reader.tensors[name]
            assert info.shape == tuple(expected.shape)
            assert info.nbytes == expected.numel() * expected.element_size()
            loaded = reader.load(name)
            assert loaded.dtype == expected.dtype, name
            assert torch.equal(loaded.to(torch.float64), expected.to(torch.float64)), name
    assert digest(path) == before  # read-only


def test_offsets_are_absolute_into_the_file(every_dtype):
    path, tensors = every_dtype
    reader = open_checkpoint(path)
    info = reader.tensors["t.f32"]
    with path.open("rb") as fh:
        fh.seek(info.offset)
        raw = fh.read(info.nbytes)
    assert raw == tensors["t.f32"].numpy().tobytes()


def test_load_float_gives_float32(every_dtype):
    path, tensors = every_dtype
    reader = open_checkpoint(path)
    out = reader.load_float("t.f8_e4m3")
    assert out.dtype == torch.float32
    assert torch.equal(out, tensors["t.f8_e4m3"].to(torch.float32))
    assert reader.load_float("scalar").shape == ()


def test_unknown_tensor_name_is_a_key_error(every_dtype):
    reader = open_checkpoint(every_dtype[0])
    with pytest.raises(KeyError):
        reader.load("nope")


def test_read_rows_reads_a_row_range_as_a_slice_would(every_dtype):
    path, tensors = every_dtype
    with open_checkpoint(path) as reader:
        for name in ("t.f32", "t.bf16", "t.f8_e4m3", "t.u8", "empty"):
            expected = tensors[name]
            for start, stop in ((0, 1), (1, 3), (2, 99), (5, 9)):  # past the last row: clamped, like a slice
                rows = reader.read_rows(name, start, stop)
                assert rows.dtype == expected.dtype and torch.equal(rows, expected[start:stop]), (name, start, stop)
        assert torch.equal(reader.read_rows("t.bf16", 1, 2, as_float=True), tensors["t.bf16"][1:2].float())
        with pytest.raises(ValueError, match="rows start at 0"):
            reader.read_rows("t.f32", -1, 2)


def test_read_into_fills_the_callers_buffer_and_stays_inside_the_tensor(every_dtype):
    path, tensors = every_dtype
    with open_checkpoint(path) as reader:
        buf = bytearray(8)
        reader.read_into("t.f32", memoryview(buf), start=4)  # elements 1 and 2
        assert bytes(buf) == tensors["t.f32"].flatten()[1:3].numpy().tobytes()
        nbytes = reader.tensors["t.f32"].nbytes
        with pytest.raises(ValueError, match="outside tensor"):  # would read the next tensor's bytes
            reader.read_into("t.f32", memoryview(bytearray(8)), start=nbytes - 4)
        with pytest.raises(ValueError, match="outside tensor"):
            reader.read_into("t.f32", memoryview(bytearray(4)), start=-4)


def test_a_file_truncated_while_open_is_an_input_error(every_dtype):
    path, _ = every_dtype
    with open_checkpoint(path) as reader:
        last = max(reader.tensors.values(), key=lambda info: info.offset + info.nbytes)
        os.truncate(path, last.offset)
        with pytest.raises(InputError, match="shorter than its header"):
            reader.read_rows(last.name, 0, last.shape[0])


def write_sharded(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    folder.mkdir()
    tensors = {f"blocks.{i}.weight": torch.full((4, 4), float(i)) for i in range(4)}
    shards = {"model-00001-of-00002.safetensors": ["blocks.0.weight", "blocks.1.weight"],
              "model-00002-of-00002.safetensors": ["blocks.2.weight", "blocks.3.weight"]}
    for shard, names in shards.items():
        save_file({n: tensors[n] for n in names}, folder / shard, metadata={"shard": shard})
    weight_map = {n: shard for shard, names in shards.items() for n in names}
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 256}, "weight_map": weight_map}))
    return index, tensors


@pytest.mark.parametrize("by_folder", [False, True])
def test_sharded_checkpoint_by_index_or_folder(tmp_path, by_folder):
    index, tensors = write_sharded(tmp_path / "ckpt")
    with open_checkpoint(index.parent if by_folder else index) as reader:
        assert reader.kind == "sharded"
        assert reader.path == index
        assert reader.metadata["total_size"] == 256
        assert set(reader.names()) == set(tensors)
        assert len(reader.files) == 3  # index + two shards, for refusing to overwrite any of them
        for name, expected in tensors.items():
            assert torch.equal(reader.load(name), expected)
            assert torch.equal(reader.read_rows(name, 1, 3), expected[1:3])  # from the shard that holds it
            assert reader.tensors[name].file.name.startswith("model-0000")


def test_folder_with_one_safetensors_file(tmp_path):
    save_file({"w": torch.ones(2)}, tmp_path / "only.safetensors")
    assert open_checkpoint(tmp_path).kind == "safetensors"


def test_ambiguous_folder_lists_what_it_found(tmp_path):
    save_file({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    save_file({"w": torch.ones(2)}, tmp_path / "b.safetensors")
    with pytest.raises(InputError, match="a.safetensors, b.safetensors"):
        open_checkpoint(tmp_path)


def write_gguf(path: Path) -> dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]]:
    """One tensor per storage kind: plain floats, legacy quants (quantized by gguf-py), a K-quant (raw blocks)."""
    rng = np.random.default_rng(0)
    values = rng.standard_normal((4, 256)).astype(np.float32)
    writer = gguf.GGUFWriter(str(path), "wan")
    writer.add_string("general.name", "tiny")
    writer.add_uint32("wan.blocks", 2)
    writer.add_array("tokens", [f"t{i}" for i in range(100)])
    writer.add_array("small", [1, 2, 3])
    stored: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]] = {}
    T = gguf.GGMLQuantizationType
    for qtype in (T.F32, T.F16, T.BF16, T.Q4_0, T.Q5_1, T.Q8_0, T.Q6_K):
        if qtype == T.Q6_K:  # gguf-py cannot quantize K-quants; random blocks still exercise the read path
            block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
            raw = rng.integers(0, 255, (4, 256 // block_size * type_size), dtype=np.uint8)
            raw[:, -2:] = 0  # the f16 super-block scale: keep it finite
        else:
            raw = gguf.quants.quantize(values, qtype)
        name = f"blocks.{qtype.name.lower()}.weight"
        writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
        stored[name] = (raw, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def test_gguf_tensors_metadata_and_dequantization(tmp_path):
    path = tmp_path / "model.gguf"
    stored = write_gguf(path)
    with open_checkpoint(path) as reader:
        assert reader.kind == "gguf"
        assert reader.metadata["general.name"] == "tiny"
        assert reader.metadata["wan.blocks"] == 2
        assert reader.metadata["small"] == [1, 2, 3]
        assert reader.metadata["tokens"] == "<array of 100 string>"
        for name, (raw, qtype) in stored.items():
            info = reader.tensors[name]
            assert info.dtype == qtype.name
            assert info.shape == (4, 256)  # safetensors order: [rows, row length]
            assert info.nbytes == raw.nbytes
            expected = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(4, 256).astype(np.float32))
            assert torch.equal(reader.load_float(name), expected), name
        # GGUF blocks are not row-addressable: rows come from the whole tensor, dequantized
        q4 = reader.load_float("blocks.q4_0.weight")
        assert torch.equal(reader.read_rows("blocks.q4_0.weight", 1, 3, as_float=True), q4[1:3])
        assert reader.load("blocks.q4_0.weight").dtype == torch.uint8
        assert reader.load("blocks.q4_0.weight").shape == (4, 256 // 32 * 18)
        assert reader.load("blocks.f16.weight").dtype == torch.float16
        assert reader.load("blocks.bf16.weight").dtype == torch.bfloat16


def test_gguf_shapes_are_reversed_into_safetensors_order(tmp_path):
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "wan")
    writer.add_tensor("w", np.zeros((3, 5), dtype=np.float32))  # numpy [3, 5] is stored as ne = [5, 3]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert open_checkpoint(path).tensors["w"].shape == (3, 5)


def test_header_only_open_of_a_sparse_56_gb_file(tmp_path):
    size = 56 * 2**30
    header = json.dumps({"small": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "huge": {"dtype": "U8", "shape": [size], "data_offsets": [8, 8 + size]}}).encode()
    header += b" " * (-len(header) % 8)
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + struct.pack("<2f", 1.0, 2.0))
    os.truncate(path, 8 + len(header) + 8 + size)  # sparse: no disk blocks behind the 56 GB
    reader = open_checkpoint(path)
    assert reader.tensors["huge"].nbytes == size
    assert reader.load("small").tolist() == [1.0, 2.0]  # reads 8 bytes, not the file
