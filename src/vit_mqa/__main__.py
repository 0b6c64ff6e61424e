"""`python -m vit_mqa ...` (what torchrun launches) is the `vit-mqa` command."""

import sys

from .apps.cli import main

sys.exit(main())
