"""The exporter-toolkit web config file: its YAML, TLS, and what it asks of each request (users, headers, rate)."""

from .file import WebConfig as WebConfig
from .file import WebConfigFile as WebConfigFile
from .policy import WebPolicy as WebPolicy
from .tls import TLSReloader as TLSReloader
from .yaml import WebConfigError as WebConfigError
