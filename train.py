"""Train the digit classifiers and publish them into the model repository: ``python train.py --help``.

The command is ``serving.toolchain.train_cli`` (also ``serving train`` once the package is installed).
"""

import sys

from serving.toolchain.train_cli import main

if __name__ == "__main__":
    sys.exit(main())
