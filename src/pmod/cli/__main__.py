"""``python -m pmod.cli``: the ``pmod`` command."""

import sys

from pmod.cli import main

sys.exit(main())
