"""Synthetic checkpoints for tests, the demo and benchmarks: every profile, scaled down, in every container and
format a ComfyUI user meets, with realistic weight statistics and injectable faults. Deterministic by seed."""

from inspect_tools.synthetic.diffusers_folders import transformer_config, write_model_folder, write_transformer_folder
from inspect_tools.synthetic.dims import SMALL_DIMS, comfyui_dims, small_dims
from inspect_tools.synthetic.faults import FAULTS, Fault, apply_faults
from inspect_tools.synthetic.gguf_files import city96_type, write_gguf
from inspect_tools.synthetic.header_only import write_header_only
from inspect_tools.synthetic.mixed import MixedPlan, marker_tensor
from inspect_tools.synthetic.state_dicts import (
    VARIANTS,
    add_activation_outliers,
    default_selection,
    float_state_dict,
    shapes_for,
)
from inspect_tools.synthetic.writers import (
    INDEX_NAME,
    nvfp4_mixed_plan,
    save_safetensors,
    write_float,
    write_fp8_comfy,
    write_nvfp4_mixed,
    write_scaled_fp8_legacy,
    write_sharded,
)

__all__ = [
    "FAULTS",
    "INDEX_NAME",
    "SMALL_DIMS",
    "VARIANTS",
    "add_activation_outliers",
    "Fault",
    "MixedPlan",
    "apply_faults",
    "city96_type",
    "comfyui_dims",
    "default_selection",
    "float_state_dict",
    "marker_tensor",
    "nvfp4_mixed_plan",
    "save_safetensors",
    "shapes_for",
    "small_dims",
    "transformer_config",
    "write_float",
    "write_fp8_comfy",
    "write_gguf",
    "write_header_only",
    "write_model_folder",
    "write_nvfp4_mixed",
    "write_scaled_fp8_legacy",
    "write_sharded",
    "write_transformer_folder",
]
