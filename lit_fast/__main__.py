"""`python -m lit_fast SUBCOMMAND ...`: the same as the `lit-fast` command."""

import sys

from lit_fast.cli import main

sys.exit(main())
