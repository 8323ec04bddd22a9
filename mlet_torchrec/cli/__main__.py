"""``python -m mlet_torchrec.cli`` = the ``mlet`` console script (what TorchX replicas run)."""

import sys

from mlet_torchrec.cli.main import main

sys.exit(main())
