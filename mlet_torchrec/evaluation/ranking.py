"""AUC and average precision from tied groups of scores: exact groups, or the bins of a logit histogram.

Both ROC-AUC and PR-AUC only need, for each distinct score (a *group*), how many positives and negatives
have it. Exact evaluation groups the sorted scores; histogram evaluation groups them by a fixed bin of
``BINS`` = 2^16 bins uniform in logit space over [-``LOGIT_LIMIT``, ``LOGIT_LIMIT``] (a prediction clamped
to [1e-7, 1 - 1e-7], as the LogLoss is; scores past the ends fall in the end bins). Bin counts are
integers, so a histogram summed over ranks is the same for any world size.

Pairs in one bin count as ties (½), so the histogram AUC is off by at most

    |AUC_hist - AUC_exact| <= ½ · Σ_b pos_b · neg_b / (P · N)        (:func:`auc_error_bound`)

which the metrics report next to it. The average precision of a histogram is sklearn's tie-aware
average precision of the binned scores (no bound is claimed for it).

Example:
    >>> import torch
    >>> pos, neg = torch.tensor([0, 1, 2]), torch.tensor([2, 1, 0])   # groups in ascending score
    >>> round(auc_from_groups(pos, neg), 4), round(auc_error_bound(pos, neg), 4)
    (0.9444, 0.0556)
"""

from __future__ import annotations

import math

import torch

BINS = 1 << 16
LOGIT_LIMIT = math.log((1 - 1e-7) / 1e-7)  # 16.118: the logit of the LogLoss clamp
BIN_WIDTH = 2 * LOGIT_LIMIT / BINS  # 4.9e-4 in logit: 1.2e-4 in probability at p = 0.5, less elsewhere


def logit_bins(logits: torch.Tensor) -> torch.Tensor:
    """The histogram bin (0 .. BINS-1, int64) of each logit; NaN goes to bin 0 (its LogLoss is NaN anyway)."""
    x = torch.nan_to_num(logits.double(), nan=-LOGIT_LIMIT, posinf=LOGIT_LIMIT, neginf=-LOGIT_LIMIT)
    return torch.floor((x + LOGIT_LIMIT) / BIN_WIDTH).clamp_(0, BINS - 1).long()


def add_to_histogram(counts: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Count rows into ``counts`` ((2, BINS) int64: negatives in row 0, positives in row 1), in place.

    A scatter of the rows' cells: the cost follows the rows, not the 2^16 bins.
    """
    cell = logit_bins(logits.reshape(-1)) + BINS * (labels.reshape(-1) > 0.5).long()
    counts.view(-1).index_put_((cell,), torch.ones_like(cell), accumulate=True)


def histogram(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(2, BINS) int64 counts of negatives (row 0) and positives (row 1) per logit bin."""
    counts = torch.zeros(2, BINS, dtype=torch.int64)
    add_to_histogram(counts, logits, labels)
    return counts


def exact_groups(
    scores: torch.Tensor, labels: torch.Tensor, presorted: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(positives, negatives) per distinct score, in ascending score order (int64); ``presorted``: the
    scores already ascend (no second sort)."""
    s, y = scores.reshape(-1), labels.reshape(-1)
    if not presorted:
        order = torch.argsort(s, stable=True)
        s, y = s[order], y[order]
    y = (y > 0.5).long()
    _, counts = torch.unique_consecutive(s, return_counts=True)
    ends = torch.cumsum(counts, 0) - 1
    cum_pos = torch.cumsum(y, 0)[ends]
    pos = torch.diff(cum_pos, prepend=cum_pos.new_zeros(1))
    return pos, counts - pos


def auc_from_groups(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """ROC-AUC of groups in ascending score order (ties count ½); NaN without both classes.

    The numerator is an exact int64 sum (2·Σ pos_g·(neg_below_g + ½ neg_g)), so it does not depend
    on the order rows arrived in; it overflows only past ~4e9 rows.
    """
    pos, neg = pos.long(), neg.long()
    p, n = int(pos.sum()), int(neg.sum())
    if p == 0 or n == 0:
        return float("nan")
    below = torch.cumsum(neg, 0) - neg
    twice = int((pos * (2 * below + neg)).sum())
    return twice / (2 * p * n)


def auc_error_bound(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """½ · Σ_g pos_g·neg_g / (P·N): how far the AUC of these groups can be from the AUC of the scores
    they group (0 when no group holds both classes); NaN without both classes."""
    pos, neg = pos.long(), neg.long()
    p, n = int(pos.sum()), int(neg.sum())
    if p == 0 or n == 0:
        return float("nan")
    return int((pos * neg).sum()) / (2 * p * n)


def average_precision_from_groups(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """Average precision (sklearn's, tie-aware) of groups in ascending score order; NaN without positives.

    Summed with ``math.fsum`` (correctly rounded), so the result does not depend on thread counts.
    """
    pos, neg = pos.long().flip(0), neg.long().flip(0)  # descending thresholds
    p = int(pos.sum())
    if p == 0 or int(neg.sum()) == 0:
        return float("nan")
    keep = (pos + neg) > 0
    pos, neg = pos[keep], neg[keep]
    tp, fp = torch.cumsum(pos, 0), torch.cumsum(neg, 0)
    terms = pos.double() * tp.double() / (tp + fp).double()
    return math.fsum(terms.tolist()) / p
