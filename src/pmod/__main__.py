"""``python -m pmod`` is the ``pmod`` command."""

from pmod.cli import main

raise SystemExit(main())
