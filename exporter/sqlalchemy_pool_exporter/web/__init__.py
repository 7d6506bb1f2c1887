"""Serving: the aiohttp app and routes, the thread server for sync apps, our HTTP connections, auth and /readyz;
config/ is the web config file."""

from .app import PortInUse as PortInUse
from .app import Server as Server
from .app import add_routes as add_routes
from .app import make_app as make_app
from .app import start_http_server as start_http_server
from .threaded import ThreadServer as ThreadServer
from .threaded import start_wsgi_server as start_wsgi_server
