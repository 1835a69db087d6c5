"""Per-layer progress of the quantization loop: a bar plus one line per finished layer."""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


class LayerProgress:
    def __init__(self, num_layers: int, label: str):
        self.bar = tqdm(total=num_layers, desc=f"quantize {label}", unit="layer", file=sys.stderr,
                        dynamic_ncols=True, leave=True)
        self.last = time.perf_counter()

    def skip(self, index: int) -> None:
        self.bar.update(1)
        self.last = time.perf_counter()

    def done(self, index: int, attrs: dict, stored: int = 0) -> None:
        """One line per layer: time, drift from the clean stream, and what the layer put on disk
        (clean state + quantized state + weights)."""
        now = time.perf_counter()
        div = attrs.get("divergence", {})
        self.bar.write(f"layer {index:3d}: {now - self.last:6.1f} s  mse {div.get('mse', float('nan')):.3e}  "
                       f"normalized mse {div.get('mse_normalized', float('nan')):.3e}  "
                       f"stored {stored / 2**20:7.1f} MiB", file=sys.stderr)
        self.bar.update(1)
        self.last = now

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "LayerProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
