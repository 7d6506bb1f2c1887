"""`python -m exporter` is `pool-exporter`."""

import sys

from .cli import main

sys.exit(main())
