"""The multiprocess directory's reader: files read without trusting them, merged, dead workers compacted."""

from .merge import Sidecar as Sidecar
