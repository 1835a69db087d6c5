"""The two-stream, one-layer-at-a-time quantization engine (no pipeline, no store)."""
