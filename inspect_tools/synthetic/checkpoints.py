"""Every checkpoint writer of the factory in one namespace (`from inspect_tools.synthetic import checkpoints`)."""

from inspect_tools.synthetic.gguf_files import write_gguf
from inspect_tools.synthetic.header_only import write_header_only
from inspect_tools.synthetic.writers import (
    write_float,
    write_fp8_comfy,
    write_nvfp4_mixed,
    write_scaled_fp8_legacy,
)

__all__ = [
    "write_float",
    "write_fp8_comfy",
    "write_gguf",
    "write_header_only",
    "write_nvfp4_mixed",
    "write_scaled_fp8_legacy",
]
