"""`python -m sqlalchemy_pool_exporter` is `pool-exporter`."""

import sys

from .cli import main

sys.exit(main())
