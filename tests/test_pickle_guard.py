"""Pickle checkpoints are refused by name and by content, before anything is unpickled."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from inspect_tools.errors import UnsafeFormatError
from inspect_tools.readers import open_checkpoint
from inspect_tools.safety import PICKLE_SUFFIXES, looks_like_pickle, refuse_pickle
from inspect_tools.synthetic.bad_inputs import PICKLE_MARKER_NAME, pickle_ckpt, pickle_payload


@pytest.mark.parametrize("build", [pickle_payload, pickle_ckpt])
def test_pickle_payload_is_refused_and_never_runs(tmp_path: Path, build):
    path = build(tmp_path)
    with pytest.raises(UnsafeFormatError, match="weights_only=True"):
        open_checkpoint(path)
    assert not (tmp_path / PICKLE_MARKER_NAME).exists()


def test_the_payload_really_would_create_the_marker(tmp_path: Path):
    """Guards the guard test: unpickling the payload (deliberately, here only) creates the marker file."""
    path = pickle_payload(tmp_path)
    pickle.loads(path.read_bytes()).close()
    assert (tmp_path / PICKLE_MARKER_NAME).exists()


@pytest.mark.parametrize("suffix", sorted(PICKLE_SUFFIXES))
def test_pickle_extensions_are_refused_whatever_the_content(tmp_path: Path, suffix: str):
    path = tmp_path / f"model{suffix}"
    save_file({"w": torch.ones(2)}, path)  # even a real safetensors file: the name says pickle
    with pytest.raises(UnsafeFormatError):
        open_checkpoint(path)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_every_binary_pickle_protocol_is_recognized(protocol: int):
    assert looks_like_pickle(pickle.dumps({"a": [1, 2]}, protocol=protocol)[:16])


def test_torch_save_zip_under_any_name(tmp_path: Path):
    path = tmp_path / "weights.data"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(UnsafeFormatError, match="torch.save zip"):
        refuse_pickle(path)


def test_safetensors_whose_header_length_starts_like_a_pickle_is_not_refused(tmp_path: Path):
    # 0x280 = 640-byte header: the file begins 0x80 0x02, like PROTO 2.
    entry = {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    header = json.dumps(entry).encode()
    header += b" " * (0x280 - len(header))  # safetensors allows trailing spaces in the header
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 0x280) + header + struct.pack("<f", 1.0))
    assert path.read_bytes()[:2] == b"\x80\x02"
    assert open_checkpoint(path).load("w").item() == 1.0
