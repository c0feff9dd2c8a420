"""``python -m serving``: the same as the ``serving`` command."""

import sys

from serving.cli import main

sys.exit(main())
