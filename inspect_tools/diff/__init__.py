"""Two checkpoints side by side: what differs and whether ComfyUI cares (the data behind `nvdiag diff`).

Everything works on Layers (inspect_tools.layers.CheckpointModel); rendering lives in inspect_tools/cli/diff_cmd.py.
Header facts are compared first (formats, dtypes, shapes, aux-tensor signatures, markers, metadata, naming); the
only tensor bytes read are scale tensors (small) and, with `values=True`, the weights of matched layers, one pair
at a time.

Verdicts come from shared/research/comfyui-load-path.md (ComfyUI comfy/ops.py `_load_quantized_module`,
comfy/quant_ops.py, comfy/utils.py `convert_old_quants`):
- input_scale is optional: absent means a dynamic per-call activation scale (amax/2688), the safe choice;
- a quantized weight needs a `.comfy_quant` tensor or a `_quantization_metadata` entry, either one;
- NVFP4 needs `.weight_scale` and `.weight_scale_2` (otherwise "Missing NVFP4 scales");
- weight_scale is re-viewed as float8_e4m3fn, so U8 and F8_E4M3 both work, 2/4-byte dtypes do not;
- weight_scale_2 accepts any float (cast to F32); F32 0-d is canonical;
- a truthy `full_precision_matrix_mult` in the marker ComfyUI loads (the metadata entry over the tensor) makes the
  layer W4A16 on Blackwell, absent or false W4A4 (activations quantized too).

The modules: alignment (which layer goes with which), facts (one layer in the rows' words), checks (the findings),
scale_stats (scale distributions), summaries (each side summed up), report (DiffReport and the entry points).
"""

from inspect_tools.diff.report import DiffReport, diff_models, diff_paths

__all__ = ["DiffReport", "diff_models", "diff_paths"]
