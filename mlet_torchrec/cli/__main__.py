"""``python -m mlet_torchrec.cli`` = the ``mlet`` console script (what TorchX replicas run)."""

import sys

from mlet_torchrec.cli.main import main

if __name__ == "__main__":  # importing it (doctest collection) must not run the CLI
    sys.exit(main())
