"""A run's test predictions, stored compactly in its store line so paired tests over test rows need no rerun.

Logits are kept as float16 (2 bytes a row), labels as bits, both base64: about 1 KB for the Criteo sample's ~400
test rows. Only small test sets are stored (``MAX_STORED_PREDICTIONS`` rows): their AUC has the widest
test-set noise, and their lines stay small. float16 keeps about 3 significant digits, so two rows whose logits
differ less than that tie; the AUC from the stored logits can differ from the run's own in the 4th decimal.
A run whose logits leave float16's range (|logit| > 65504, a diverged learning rate) keeps them as float32
(``logits_f32``): in float16 they would all become ±inf and tie.

Example:
    >>> import numpy as np
    >>> rec = encode_predictions(np.array([0.5, -1.25, 2.0]), np.array([1, 0, 1]))
    >>> rec["rows"], decode_predictions(rec)[0].tolist(), decode_predictions(rec)[1].tolist()
    (3, [0.5, -1.25, 2.0], [1, 0, 1])
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

F16_MAX = float(np.finfo(np.float16).max)

MAX_STORED_PREDICTIONS = 4096
"""Test sets up to this many rows get their predictions stored (the Criteo sample's do, MovieLens' 10,000 not)."""


def encode_predictions(logits: Any, labels: Any) -> dict[str, Any]:
    """``{"rows", "logits_f16" (or "logits_f32"), "labels_bits"}`` of a split's logits and 0/1 labels
    (array-likes, row order).

        >>> sorted(encode_predictions(np.array([1e6, -2.0]), np.array([1, 0])))
        ['labels_bits', 'logits_f32', 'rows']
    """
    lg = np.asarray(logits, dtype=np.float32).reshape(-1)
    lb = np.asarray(labels).reshape(-1) > 0.5
    if lg.shape != lb.shape:
        raise ValueError(f"{lg.size} logits for {lb.size} labels")
    finite = np.abs(lg[np.isfinite(lg)])
    key, dtype = ("logits_f32", "<f4") if finite.size and finite.max() > F16_MAX else ("logits_f16", "<f2")
    return {
        "rows": int(lg.size),
        key: base64.b64encode(lg.astype(dtype).tobytes()).decode("ascii"),
        "labels_bits": base64.b64encode(np.packbits(lb).tobytes()).decode("ascii"),
    }


def decode_predictions(rec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """``(logits as float64, labels as int8)`` of an :func:`encode_predictions` record."""
    n = int(rec["rows"])
    key = next((k for k in ("logits_f16", "logits_f32") if k in rec), None)
    if key is None:
        raise ValueError("stored predictions hold neither logits_f16 nor logits_f32")
    dtype = "<f2" if key == "logits_f16" else "<f4"
    logits = np.frombuffer(base64.b64decode(rec[key]), dtype=dtype).astype(np.float64)
    labels = np.unpackbits(np.frombuffer(base64.b64decode(rec["labels_bits"]), dtype=np.uint8))[:n]
    if logits.size != n:
        raise ValueError(f"stored predictions hold {logits.size} logits for {n} rows")
    return logits, labels.astype(np.int8)
