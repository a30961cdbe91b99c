"""Reading checkpoints into Layers and the commands that examine them (inspect, diff, lint, roundtrip)."""
