"""Every bad-input class ends in one clear InputError naming the file, never another exception."""

from __future__ import annotations

from pathlib import Path

import pytest

from inspect_tools.errors import InputError, UnsafeFormatError
from inspect_tools.readers import open_checkpoint
from inspect_tools.synthetic.bad_inputs import BAD_INPUTS, UNSAFE_INPUTS


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_gives_one_line_input_error(tmp_path: Path, name: str):
    path = BAD_INPUTS[name](tmp_path / name)
    expected = UnsafeFormatError if name in UNSAFE_INPUTS else InputError
    with pytest.raises(expected) as caught:
        open_checkpoint(path)
    message = str(caught.value)
    assert "\n" not in message
    assert caught.value.path is not None and Path(caught.value.path).name in message
    if name not in UNSAFE_INPUTS:
        assert not isinstance(caught.value, UnsafeFormatError)


def test_registry_covers_the_classes_issue_9_lists():
    wanted = {"empty_file", "truncated", "header_length_past_end", "header_length_over_bound", "header_not_json",
              "header_not_object", "unknown_dtype", "shape_bytes_mismatch", "offset_past_end", "overlapping_offsets",
              "duplicate_across_shards", "index_not_json", "index_without_weight_map", "index_missing_shard",
              "index_parent_path", "index_absolute_path", "index_symlink_escape", "gguf_bad_magic",
              "gguf_unsupported_version", "gguf_truncated_data", "gguf_impossible_counts",
              "directory_without_checkpoint", "missing_path", "pickle_payload", "torch_zip_pt"}
    assert wanted <= set(BAD_INPUTS)
