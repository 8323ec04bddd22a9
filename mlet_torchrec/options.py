"""The choices and defaults of the library's verbs that the command line offers: one owner, no torch.

The library functions take their defaults from here and check their arguments against these choices; the
``mlet`` subcommands import the same names for argparse's ``choices`` and help, so ``mlet --help`` lists
them without importing torch.

    >>> OUTPUT_SHARDINGS
    ('same', 'auto', 'table_wise', 'row_wise', 'column_wise', 'table_row_wise')
    >>> AUC_MODES, EXPORT_FORMATS
    (('histogram', 'exact'), ('npy', 'safetensors'))
"""

from __future__ import annotations

from typing import get_args

from mlet_torchrec.config import ShardingType

BLOCK_ROWS = 16384
"""Rows per block of the W1 @ W2 product (training's forward and collapse)."""

OUTPUT_SHARDINGS = ("same", *(s for s in get_args(ShardingType) if s != "data_parallel"))
"""Shardings of a collapse output: 'same' mirrors the input, the others ask TorchRec's planner."""
ACCUMULATE = ("float32", "float64")
"""Precisions of collapse's product (rounded once to float32)."""
COLLAPSE_TOLERANCE = 1e-5
"""Largest |p_collapsed - p_factored| collapse accepts."""

PRECISIONS = ("int8", "fp32")
"""The models an export holds; scoring an export picks its INT8 one when it was exported, else FP32."""

AUC_MODES = ("histogram", "exact")
"""How evaluation computes the AUC: 2^16 logit bins (bounded memory) or every score on rank 0."""
EXPORT_FORMATS = ("npy", "safetensors")
"""Plain float32 table files export writes besides the TorchRec modules."""
AUC_TOLERANCE = 1e-3
"""Largest AUC drop of the INT8 model against FP32 that export accepts."""
