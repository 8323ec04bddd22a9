"""What a user sees in the terminal: our own log lines, not the libraries' deprecation chatter."""

from __future__ import annotations

import logging
import warnings


def configure_logging(verbose: bool = False) -> None:
    """INFO for ``mlet``; warnings of torch/TorchRec/FBGEMM shown only with ``verbose``.

    Call it in every process: workers started by elastic_launch do not inherit warning filters.
    """
    # root at ERROR hides libraries' warnings logged on the root logger; ours propagate to its handler
    logging.basicConfig(level=logging.DEBUG if verbose else logging.ERROR, format="%(message)s", force=True)
    logging.getLogger("mlet").setLevel(logging.DEBUG if verbose else logging.INFO)
    if verbose:
        return
    for category in (FutureWarning, UserWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(torch|torchrec|fbgemm_gpu)(\.|$)")
    # ShardedTensor.size() warns from our own call sites
    warnings.filterwarnings("ignore", message=".*DTensor instead.*", category=FutureWarning)
    for name in ("torchrec", "fbgemm_gpu", "torch.distributed", "torch.fx"):
        logging.getLogger(name).setLevel(logging.ERROR)
