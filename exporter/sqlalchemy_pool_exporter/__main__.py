"""`python -m sqlalchemy_pool_exporter` is `pool-exporter`."""

import sys

from .service.cli import main

sys.exit(main())
