"""``python -m lmzoo ...``: the same as the ``lmzoo`` command (and what ``torchrun -m lmzoo`` runs)."""

import sys

from lmzoo.cli.main import main

sys.exit(main())
