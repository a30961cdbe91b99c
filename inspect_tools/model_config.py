"""The diffusers `config.json` beside a checkpoint's weights: the ground truth for what the keys cannot show.

A diffusers model folder (`transformer/`) holds the weights (one file or shards + index.json) and the model class's
config.json. Some variants differ only there: Qwen Image Edit 2511 is the 2512 tensor set with `"zero_cond_t": true`.
The file is untrusted: its size and nesting are bounded, anything but a JSON object is refused (one line, exit 2),
because a truncated config (a partial download) must not silently make the model another variant. A config.json
that is no diffusers model config (no `_class_name`) is none of our business and is ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from inspect_tools.errors import InputError
from inspect_tools.readers.bounded_json import loads_bounded
from inspect_tools.safety import read_at_most

CONFIG_NAME = "config.json"
# A diffusers transformer config is a few dozen keys (under 2 KB); 1 MiB is far beyond any real one.
MAX_CONFIG_BYTES = 1 << 20


def config_path(weights: Path) -> Path:
    """Where the config.json of the checkpoint at `weights` (a file or an index.json) would be."""
    return weights.parent / CONFIG_NAME


def read_config_beside(weights: str | Path) -> dict[str, Any] | None:
    """The diffusers model config beside `weights`, None when there is none (or it is not a diffusers config)."""
    path = config_path(Path(weights))
    if not path.is_file():
        return None
    raw = read_at_most(path, MAX_CONFIG_BYTES, f"larger than {MAX_CONFIG_BYTES >> 10} KiB: not a model config")
    try:
        config = loads_bounded(raw)
    except UnicodeDecodeError:
        raise InputError("not UTF-8 JSON; the model config must be readable to tell the variant "
                         "(re-download it, or remove it)", str(path)) from None
    except ValueError as exc:
        reason = str(exc).splitlines()[0][:120]
        raise InputError(f"not valid JSON ({reason}); the model config must be readable to tell the variant "
                         "(re-download it, or remove it)", str(path)) from None
    if not isinstance(config, dict):
        raise InputError(f"a JSON {type(config).__name__}, not the object a model config is", str(path))
    return config if isinstance(config.get("_class_name"), str) else None
