"""``python -m selfreport``: the same as the ``selfreport`` command."""

import sys

from .cli import main

sys.exit(main())
