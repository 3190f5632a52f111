"""`python train.py --config configs/X.yaml [overrides]`; see README.md and `python train.py --help`."""

import sys

from lit_fast.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
