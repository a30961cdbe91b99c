"""Shared fixtures: small synthetic checkpoints of every kind, written once per test session.

Scaled-down models (2 blocks, width 256) from inspect_tools.synthetic; each file is a few MB and takes well under
a second to write. Tests that need a variant (another fault, naming, prefix) use `make_checkpoint`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from inspect_tools.synthetic import checkpoints

WAN = "wan2.2-ti2v-5b"

_WRITERS = {
    "float": checkpoints.write_float,
    "nvfp4-mixed": checkpoints.write_nvfp4_mixed,
    "fp8-comfy": checkpoints.write_fp8_comfy,
    "scaled-fp8": checkpoints.write_scaled_fp8_legacy,
    "gguf": checkpoints.write_gguf,
}


@pytest.fixture(scope="session")
def fixture_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def make_checkpoint(fixture_dir: Path) -> Callable[..., Path]:
    """make_checkpoint(kind, variant=WAN, name=None, **options) -> path; kinds: float, nvfp4-mixed, fp8-comfy,
    scaled-fp8, gguf. Same arguments give the same file (cached for the session)."""
    cache: dict[str, Path] = {}

    def make(kind: str, variant: str = WAN, name: str | None = None, **options: object) -> Path:
        key = f"{kind}|{variant}|{sorted(options.items(), key=lambda kv: kv[0])!r}"
        if key not in cache:
            suffix = ".gguf" if kind == "gguf" else ("" if options.get("sharded") else ".safetensors")
            target = fixture_dir / f"{name or f'{kind}-{variant}-{len(cache)}'}{suffix}"
            cache[key] = _WRITERS[kind](target, variant, **options)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def wan_float(make_checkpoint: Callable[..., Path]) -> Path:
    return make_checkpoint("float", name="wan_f32")


@pytest.fixture(scope="session")
def wan_float_sharded_diffusers(make_checkpoint: Callable[..., Path]) -> Path:
    """The index.json of a 2-shard diffusers-named FP32 WAN TI2V checkpoint."""
    return make_checkpoint("float", naming="diffusers", sharded=2, name="wan_f32_diffusers")


@pytest.fixture(scope="session")
def wan_nvfp4_mixed(make_checkpoint: Callable[..., Path]) -> Path:
    return make_checkpoint("nvfp4-mixed", name="wan_nvfp4_mixed")


@pytest.fixture(scope="session")
def wan_gguf_q4_0(make_checkpoint: Callable[..., Path]) -> Path:
    return make_checkpoint("gguf", qtype="Q4_0", name="wan_q4_0")


@pytest.fixture(scope="session")
def wan_gguf_q5_k_m(make_checkpoint: Callable[..., Path]) -> Path:
    return make_checkpoint("gguf", qtype="Q5_K_M", name="wan_q5_k_m")


@pytest.fixture(scope="session")
def wan_fp8_comfy(make_checkpoint: Callable[..., Path]) -> Path:
    return make_checkpoint("fp8-comfy", name="wan_fp8_comfy")


@pytest.fixture(scope="session")
def wan_scaled_fp8(make_checkpoint: Callable[..., Path]) -> Path:
    return make_checkpoint("scaled-fp8", name="wan_scaled_fp8")


@pytest.fixture(scope="session")
def qwen_nvfp4_mixed(make_checkpoint: Callable[..., Path]) -> Path:
    return make_checkpoint("nvfp4-mixed", "qwen-image-2512", name="qwen_nvfp4_mixed")


@pytest.fixture(scope="session")
def flux_nvfp4_mixed(make_checkpoint: Callable[..., Path]) -> Path:
    return make_checkpoint("nvfp4-mixed", "flux1-dev", name="flux_nvfp4_mixed")


# --- ComfyUI, the real client ---------------------------------------------------------------------------------
# Found from COMFYUI_PATH, else the shared/comfyui snapshot beside the checkout. In CI (NVDIAG_REQUIRE_COMFYUI=1) a
# missing or unimportable ComfyUI fails the tests that need it; elsewhere they skip with the reason.
SHARED_COMFYUI = Path(__file__).resolve().parents[2] / "shared" / "comfyui"


@pytest.fixture(scope="session")
def comfyui():
    """The ComfyUI runtime (comfy.sd and friends) imported in CPU mode, once per session."""
    import os

    from inspect_tools.comfyui.runtime import ComfyUIUnavailable, load_runtime

    root = os.environ.get("COMFYUI_PATH") or (str(SHARED_COMFYUI) if SHARED_COMFYUI.is_dir() else None)
    try:
        return load_runtime(root, device="cpu")
    except ComfyUIUnavailable as exc:
        if os.environ.get("NVDIAG_REQUIRE_COMFYUI") == "1":
            pytest.fail(f"NVDIAG_REQUIRE_COMFYUI=1 but ComfyUI is unusable: {exc}")
        pytest.skip(f"no ComfyUI: {exc}")
