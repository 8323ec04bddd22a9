"""A trained artifact on disk, resolved once: a training run/checkpoint or a collapse output."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

from mlet_torchrec.evaluation.evaluate import predict_split
from mlet_torchrec.evaluation.metrics import ctr_metrics
from mlet_torchrec.serving.collapse import MANIFEST, load_collapsed, load_factored


def evaluate_path(path: str | Path, split: str = "test") -> Dict[str, float]:
    """Metrics of a training checkpoint (run dir) or a collapse output on ``split``, in one process."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        model, config, meta = load_collapsed(path)
    else:
        model, config, meta, _ = load_factored(path)
    probs, labels = predict_split(model, config.data.path, split, config.train.eval_batch_size, meta)
    return {"split": split, **ctr_metrics(probs, labels).as_dict()}
