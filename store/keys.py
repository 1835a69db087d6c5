"""The key scheme: a stage's identity is its inputs.

A record in the store is addressed by a *key*: the digest of the stage name, the stage's code
version and everything the stage reads. Never a run id, never a path, never a time. Hence:

* the same inputs give the same key in every run, so a killed job finds its finished records
  and resumes where it stopped (a 70B job killed at layer 57 resumes at layer 57);
* a variant (other alpha/beta/bits) shares every record whose inputs it shares;
* bumping a stage's version invalidates exactly that stage and everything keyed on it.

Inputs are other keys (strings) or JSON-able configurations; upstream records enter a key
through *their* keys, so a key transitively covers the whole history that produced it. The
pipeline's recipes all live in ``loaq.stages.keys``; in outline::

    model   = stage_key("model", 1, weights=..., config=..., tokenizer=...)
    calib   = stage_key("calibration", 1, model=model, spec=calibration_config, data=...)
    embed   = stage_key("embed", 1, dtype="torch.float32", model=model, calibration=calib)
    clean_l = stage_key("clean_layer", 2, dtype=..., model=model, layer=l, prev=clean_{l-1} or embed)
    quant_l = stage_key("quant_layer", ALGORITHM_VERSION, prev=quant_{l-1} or embed, layer=l, config=config_l)

The quantized chain is a hash chain: ``quant_l`` depends on ``config_0 .. config_l`` and on
nothing after ``l``. Two variants that agree on the configs of layers ``0..k`` therefore share
exactly the keys of layers ``0..k`` (and thus the records); a change of ``ALGORITHM_VERSION``
changes ``quant_0`` and with it the whole quantized chain, but no clean-stream or calibration key.

Canonical JSON (what is hashed) is: keys sorted, no whitespace, UTF-8, floats written with
Python's shortest round-trip ``repr`` (stable across platforms and runs). ``1`` and ``1.0`` and
``True`` are three different values, as are ``0.0`` and ``-0.0``; non-finite floats are
encoded as ``{"$float": "nan"|"inf"|"-inf"}``. Pydantic models (``model_dump()``), dataclasses
(``asdict``), enums (their value), tuples (lists), sets (sorted), paths (strings), bytes
(``{"$bytes": hex}``), numpy scalars and torch/numpy dtypes (their name) are accepted; tensors
and arrays are refused: digest their content and pass the digest instead.

Weights enter the scheme through :func:`file_digest`, a content digest (a streamed sha256 of a
file, or of the sorted shards of a checkpoint directory). It is deliberately never derived from
sizes or modification times: a re-downloaded or edited checkpoint must get a new key.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

#: Hex characters of a record key (128 bits: collisions are not a practical concern).
KEY_HEX_CHARS = 32

#: Read size of :func:`file_digest`; weights are streamed, never loaded whole.
DIGEST_CHUNK_BYTES = 8 * 1024 * 1024


def to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` to plain JSON values (dict/list/str/int/float/bool/None), canonically.

    Raises ``TypeError`` for values that have no canonical form (tensors, arbitrary objects).
    """
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if math.isfinite(obj):
            return float(obj)
        return {"$float": "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")}
    if hasattr(obj, "model_dump") and not isinstance(obj, type):
        # Python mode (not mode="json"): pydantic's JSON mode writes inf/nan as null, which
        # would make two different configs collide.
        return to_jsonable(obj.model_dump())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return _jsonable_mapping(obj)
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(item) for item in obj]
    if isinstance(obj, (set, frozenset)):
        items = [to_jsonable(item) for item in obj]
        return sorted(items, key=lambda item: json.dumps(item, sort_keys=True))
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (bytes, bytearray)):
        return {"$bytes": bytes(obj).hex()}
    if isinstance(obj, np.dtype):
        return str(obj)
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    torch = sys.modules.get("torch")  # only consulted if the caller already imported torch
    if torch is not None and isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    raise TypeError(
        f"cannot make a canonical key input of {type(obj).__name__!s}; pass JSON-able values "
        "(for tensors or arrays, digest their content and pass the digest)"
    )


def _jsonable_mapping(mapping: Mapping) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise TypeError(f"mapping keys must be str or int, got {type(key).__name__}: {key!r}")
        name = str(key)  # JSON objects only have string keys; 1 and "1" become the same key
        if name in out:
            raise ValueError(f"mapping has both {key!r} and its string form as keys")
        out[name] = to_jsonable(value)
    return out


def canonical_json(obj: Any) -> str:
    """The canonical JSON text of ``obj``: sorted keys, no whitespace, repr-stable floats."""
    return json.dumps(
        to_jsonable(obj),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )


def digest(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj``, as ``KEY_HEX_CHARS`` hex characters."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()[:KEY_HEX_CHARS]


def stage_key(stage: str, version: str | int, /, **inputs: Any) -> str:
    """The key of the record that stage ``stage`` at code version ``version`` makes of ``inputs``.

    ``inputs`` are upstream keys and JSON-able configs (see the module docstring for the
    examples of each stage). Bump ``version`` whenever the stage's code changes its output.
    """
    if not isinstance(stage, str) or not stage:
        raise ValueError(f"stage must be a non-empty string, got {stage!r}")
    if isinstance(version, bool) or not isinstance(version, (str, int)):
        raise TypeError(f"version must be a str or an int, got {version!r}")
    return digest({"stage": stage, "version": version, "inputs": inputs})


def file_digest(
    path: str | os.PathLike,
    *,
    pattern: str = "*.safetensors",
    chunk_bytes: int = DIGEST_CHUNK_BYTES,
) -> str:
    """Content digest (sha256, 64 hex characters) of a file or of a directory of shards.

    A file is streamed in ``chunk_bytes`` reads, so the digest of a single file equals
    ``sha256sum``'s (and a Hugging Face LFS oid). For a directory, the files directly inside it
    that match ``pattern`` are digested in sorted name order and the result is the sha256 of
    the canonical JSON list of ``{"name", "sha256"}``: renaming, adding or changing a shard
    changes the digest. Other files (configs, the shard index) are not included unless
    ``pattern`` selects them (a recursive pattern such as ``"**/*.safetensors"`` names files by
    their path relative to the directory).
    """
    root = Path(path)
    if root.is_file():
        return _stream_sha256(root, chunk_bytes)
    if not root.is_dir():
        raise FileNotFoundError(f"no file or directory at {root}")
    shards = sorted((p for p in root.glob(pattern) if p.is_file()), key=lambda p: p.as_posix())
    if not shards:
        raise FileNotFoundError(f"no file matching {pattern!r} in {root}")
    listing = [
        {"name": p.relative_to(root).as_posix(), "sha256": _stream_sha256(p, chunk_bytes)}
        for p in shards
    ]
    return hashlib.sha256(canonical_json(listing).encode("utf-8")).hexdigest()


def _stream_sha256(path: Path, chunk_bytes: int) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(chunk_bytes):
            sha.update(chunk)
    return sha.hexdigest()
