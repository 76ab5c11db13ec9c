"""``python -m neuralign``: the ``neuralign`` command."""

import sys

from .cli import main

sys.exit(main())
