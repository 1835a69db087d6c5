"""The two-stream, one-layer-at-a-time quantization engine (no pipeline, no store)."""

# Version of everything that determines a quantized layer's result (quant/ math and this engine).
# It enters every quantized-chain store key: bump it when a change alters quantized weights, and
# exactly the quantized chain is recomputed while calibration, embeddings and the clean stream are
# reused.
ALGORITHM_VERSION = 2
