"""The stage store: cached, resumable records keyed by their inputs (Zarr v3 on any fsspec URL).

* ``keys``       the key scheme: ``stage_key(stage, version, **inputs)``, ``file_digest``
* ``store``      ``Store(url)``: ``writer``/``open``/``is_complete``/``verify``/``list``/...
* ``writer``     the write protocol (micro-batches, completion mark last, disk-full handling)
* ``records``    ``Record`` (reading, corruption detection) and ``RecordInfo``
* ``dtypes``     dtype storage (bfloat16/float8 as raw bits)
* ``locks``      inter-process locks and the consistency model
* ``events``     the per-run execution log ("computed"/"reused")
* ``retention``  ``gc`` and the default retention policy
* ``layout``     where things live on disk and the metadata field names

Typical stage (the pipeline's key recipes are in ``loaq.stages.keys``)::

    key = stage_key("clean_layer", CLEAN_VERSION, dtype="torch.bfloat16", model=model_key, layer=layer,
                    prev=prev_key)
    if store.is_complete(key):
        store.log_event(run_id, "clean-layer", key, "reused")
    else:
        with store.writer(key, kind="clean_state", attrs={"layer": layer}) as w:
            w.create("hidden", (n_samples, seqlen, width), torch.bfloat16, chunk_tokens=batch)
            for start in range(0, n_samples, batch):
                w.write("hidden", start, compute(start, batch))
        store.log_event(run_id, "clean-layer", key, "computed")
    hidden = store.open(key).read("hidden", start, stop)
"""

from .errors import (
    CorruptRecord,
    IncompleteRecord,
    RecordBusy,
    RecordExists,
    StoreError,
    StoreLocked,
    StoreWriteError,
)
from .events import ACTIONS
from .keys import canonical_json, digest, file_digest, stage_key, to_jsonable
from .layout import KINDS
from .locks import StoreLock
from .records import Record, RecordInfo
from .retention import default_keep, gc
from .store import Store, default_compressor
from .writer import RecordWriter

__all__ = [
    "ACTIONS",
    "KINDS",
    "CorruptRecord",
    "IncompleteRecord",
    "Record",
    "RecordBusy",
    "RecordExists",
    "RecordInfo",
    "RecordWriter",
    "Store",
    "StoreError",
    "StoreLock",
    "StoreLocked",
    "StoreWriteError",
    "canonical_json",
    "default_compressor",
    "default_keep",
    "digest",
    "file_digest",
    "gc",
    "stage_key",
    "to_jsonable",
]
