"""Plan, encode, write and gate ComfyUI-native NVFP4 mixed checkpoints."""
