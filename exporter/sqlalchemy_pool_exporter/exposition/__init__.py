"""Out of the process: the pools as prometheus_client metrics, the fast /metrics text, the multiprocess files."""

from .collector import PoolCollector as PoolCollector
from .render import Exposition as Exposition
from .writer import MultiprocessWriter as MultiprocessWriter
