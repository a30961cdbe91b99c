"""Header-only commands start without torch or gguf-py (importing torch alone takes about a second).

Each check runs in a fresh interpreter: this test process has long since imported torch itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

# Runs `nvdiag inspect` and `nvdiag lint --header-only` in-process on every path given, then reports their exit
# codes and which heavy modules got imported along the way.
HEADER_ONLY_RUN = """
import json, sys
from inspect_tools.cli import main

codes = []
for path in sys.argv[1:]:
    codes.append(main(["inspect", path, "--format", "json"]))
    codes.append(main(["lint", "--header-only", path, "--format", "json"]))
heavy = sorted(m for m in ("torch", "gguf", "numpy") if m in sys.modules)
print(json.dumps({"codes": codes, "heavy": heavy}), file=sys.stderr)
"""


def run_header_only(*paths: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", HEADER_ONLY_RUN, *map(str, paths)],
                          capture_output=True, text=True, check=True, timeout=120)
    return json.loads(proc.stderr.strip().splitlines()[-1])


def test_importing_the_cli_loads_no_torch() -> None:
    code = "import sys, inspect_tools.cli; print(sorted(m for m in ('torch', 'gguf') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert proc.stdout.strip() == "[]"


def test_inspect_and_header_only_lint_never_import_torch(
    wan_nvfp4_mixed: Path, wan_float_sharded_diffusers: Path, wan_scaled_fp8: Path
) -> None:
    # NVFP4 with comfy_quant marker tensors (read as raw bytes), a sharded diffusers-named float source, legacy FP8
    result = run_header_only(wan_nvfp4_mixed, wan_float_sharded_diffusers, wan_scaled_fp8)
    assert all(code in (0, 1) for code in result["codes"]), result  # 1 = findings; 2 would be unreadable input
    assert "torch" not in result["heavy"]
    assert "gguf" not in result["heavy"]


# Runs one command in-process and reports, for each early read it starts, whether torch was imported by then.
READ_BEFORE_TORCH_RUN = """
import json, sys
from inspect_tools.cli import main
from inspect_tools import cuda_driver
from inspect_tools.readers import prefetch

started, driver = [], []
def recording(original, into):
    def start(*args, **kwargs):
        into.append("torch" in sys.modules)
        return original(*args, **kwargs)
    return start
prefetch.start = recording(prefetch.start, started)
prefetch.warm_checkpoint = recording(prefetch.warm_checkpoint, started)
cuda_driver.start = recording(cuda_driver.start, driver)
code = main(sys.argv[1:])
print(json.dumps({"code": code, "torch_imported_when_reading_started": started,
                  "torch_imported_when_the_cuda_driver_started": driver}), file=sys.stderr)
"""


def first_read_started(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", READ_BEFORE_TORCH_RUN, *args],
                          capture_output=True, text=True, timeout=300)
    return json.loads(proc.stderr.strip().splitlines()[-1])


def test_roundtrip_starts_reading_its_inputs_before_it_imports_torch(wan_nvfp4_mixed: Path, wan_float: Path) -> None:
    # importing torch takes seconds in a fresh process (more than reading a 4 GB source on a fast disk): the
    # command's input must already be on its way into memory meanwhile
    result = first_read_started("roundtrip", str(wan_nvfp4_mixed), "--against", str(wan_float), "--format", "json")
    assert result["code"] in (0, 1)
    assert result["torch_imported_when_reading_started"] == [False]


def test_convert_on_the_gpu_starts_reading_its_source_before_it_imports_torch(wan_float: Path, tmp_path: Path) -> None:
    # without CUDA the command then stops with a usage error; the read has started before torch either way
    result = first_read_started("convert", str(wan_float), str(tmp_path / "out.safetensors"), "--preset",
                                "wan2.2-ti2v-5b", "--device", "cuda", "--format", "json")
    started = result["torch_imported_when_reading_started"]  # warm_checkpoint, then the start it calls
    assert started and not any(started)
    assert result["torch_imported_when_the_cuda_driver_started"] == [False]


def test_roundtrip_on_the_gpu_starts_cudas_driver_before_it_imports_torch(wan_nvfp4_mixed: Path,
                                                                         wan_float: Path) -> None:
    # the driver's start (cuInit, the primary context) overlaps with torch's import instead of following it; on this
    # machine there is no driver, and the command still ends with its usage error, not a hang or a traceback
    result = first_read_started("roundtrip", str(wan_nvfp4_mixed), "--against", str(wan_float), "--device", "cuda",
                                "--format", "json")
    assert result["code"] == (0 if torch_sees_cuda() else 2)
    assert result["torch_imported_when_the_cuda_driver_started"] == [False]
    assert result["torch_imported_when_reading_started"] == [False]


def torch_sees_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
