"""``python -m webchat.bench``: the same as the ``webchat-bench`` command."""

import sys

from webchat.bench.cli import main

sys.exit(main())
