"""``python -m autohybrid ...``: the ``autohybrid`` command."""

import sys

from autohybrid.cli.main import main

sys.exit(main())
