"""`python -m flywheel` is the `flywheel` command."""

import sys

from flywheel.cli import main

sys.exit(main())
