"""In the application, on every checkout: the hooks on one engine, the plain counters they feed, and the read side.

Bottom to top: `hooks` (the undo list), `pool` (the hot path: each pool's connect() and return),
`dialect` (transactions, statements, connects), `leaks`, `failures`, `stats` (the counters),
`holders` (who holds a connection), `reading` (the pool's live numbers), `samples` and `views`
(one walk over a reading and its stats), `handle` (one engine's parts, assembled).
"""

from .handle import PoolHandle as PoolHandle
from .handle import handle_of as handle_of
from .holders import holder as holder
from .reading import PoolReading as PoolReading
from .reading import PoolSource as PoolSource
from .stats import PoolStats as PoolStats
