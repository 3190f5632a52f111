"""`python predict.py --config configs/X.yaml [overrides]`; see README.md and `python predict.py --help`."""

import sys

from lit_fast.cli import predict_main

if __name__ == "__main__":
    sys.exit(predict_main())
