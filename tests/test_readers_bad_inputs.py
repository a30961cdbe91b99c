"""Every bad-input class ends in one clear InputError naming the file, never another exception."""

from __future__ import annotations

from pathlib import Path

import pytest

from inspect_tools.errors import InputError, UnsafeFormatError
from inspect_tools.layers import open_model
from inspect_tools.lint import lint_model
from inspect_tools.readers import open_checkpoint
from inspect_tools.readers.bounded_json import loads_bounded
from inspect_tools.synthetic.bad_inputs import BAD_INPUTS, MALFORMED_LAYERS, UNSAFE_INPUTS


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


def test_registry_covers_the_classes_issues_17_and_22_list():
    wanted = {"gguf_tensor_past_end", "gguf_offset_2_64", "gguf_fewer_tensors_listed", "gguf_too_many_tensors",
              "gguf_huge_string_array", "shape_numel_overflow", "shape_dim_2_64", "shape_dim_2_70",
              "too_many_tensors", "index_symlink_loop"}
    assert wanted <= set(BAD_INPUTS)
    assert {"nvfp4_weight_0d", "nvfp4_weight_1d", "nvfp4_weight_f4", "nvfp4_weight_f6", "nvfp4_weight_f32",
            "nvfp4_weight_odd_shape", "nvfp4_scale_wrong_shape", "marker_nested_deep", "metadata_nested_deep",
            "metadata_huge_integer", "metadata_format_object"} <= set(MALFORMED_LAYERS)


@pytest.mark.parametrize("name", sorted(MALFORMED_LAYERS))
def test_a_malformed_layer_is_a_finding_not_an_unreadable_file(tmp_path: Path, name: str):
    """These files are readable containers: they open, and lint names what is wrong with their one layer."""
    build, cause = MALFORMED_LAYERS[name]
    with open_model(build(tmp_path / name)) as model:
        findings = lint_model(model)
    assert cause in {f.cause for f in findings}, [f.to_json() for f in findings]


@pytest.mark.parametrize(("text", "why"), [
    ("[" * 10_000 + "]" * 10_000, "nested deeper"),
    ('{"a": ' * 65 + "1" + "}" * 65, "nested deeper"),
    ('{"format": ' + "1" * 4400 + "}", "digits"),
    ('{"format": "nvfp4", "x": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}', None),
])
def test_marker_json_is_bounded_before_it_is_parsed(text: str, why: str | None):
    """Depth and integer length are refused with a reason (no RecursionError); brackets inside strings do not
    count."""
    if why is None:
        assert loads_bounded(text)["format"] == "nvfp4"
        return
    with pytest.raises(ValueError, match=why):
        loads_bounded(text)


def test_sixty_four_levels_are_enough_for_any_marker():
    nested = '{"a": ' * 63 + "1" + "}" * 63
    assert loads_bounded(nested)["a"]["a"]["a"]


def test_a_gguf_header_costs_memory_linear_in_its_tensors(tmp_path: Path):
    """20k legal tensor records (zero bytes each): gguf-py's reader took ~200 MB per MB of such a header (issue 22);
    nvdiag's own reader keeps well under a kilobyte per tensor (measured: ~530 bytes)."""
    import tracemalloc

    from inspect_tools.synthetic.bad_inputs import gguf_bytes

    count = 20_000
    path = tmp_path / "many.gguf"
    path.write_bytes(gguf_bytes([(f"t{i}", 0, (0,), 0) for i in range(count)], b""))
    tracemalloc.start()
    try:
        with open_checkpoint(path) as reader:
            assert len(reader.tensors) == count
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1000 * count, f"{peak / count:.0f} bytes per tensor for a {path.stat().st_size}-byte header"
