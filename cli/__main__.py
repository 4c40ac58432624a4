"""``python -m branchwise.cli``: the ``branchwise`` command."""

import sys

from . import main

sys.exit(main())
