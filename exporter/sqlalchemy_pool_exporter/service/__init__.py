"""The command: `pool-exporter serve|demo`, its settings, the server's own view and the demo."""

from .cli import main as main
from .settings import Settings as Settings
