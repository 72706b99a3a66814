"""``python -m weightgeom ...`` is the ``weightgeom`` (and ``harness``) console script, for launchers
that start modules (``torchrun -m weightgeom run asymmetry``)."""

import sys

from weightgeom.harness.cli import main

sys.exit(main())
