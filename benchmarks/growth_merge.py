"""Child of benchmarks.growth's merge rows: LIVE forked workers write real multiprocess files, the sidecar merges them.

Usage: PROMETHEUS_MULTIPROC_DIR=DIR python -m benchmarks.growth_merge DIR LIVE GONE REPEAT
Prints one JSON line: the median merge with LIVE workers alive and, when GONE > 0, the one scrape
that reaps the GONE workers that came and went after them, then the steady merge. Workers are
forked as in benchmarks.sidecar_child (whose helpers this reuses); only `Sidecar(dir).merge()` is
called, so that the sidecar's internals can change under it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from time import perf_counter
from typing import Any

from sqlalchemy_pool_exporter.sidecar import Sidecar

from .sidecar_child import _fork, _leave, _median_ms, _stay

# Workers forked at a time while churning, as a process manager recycles them.
BATCH = 16


def _files(directory: str) -> int:
    return len(list(Path(directory).glob("*.db")))


def main(directory: str, live: int, gone: int, repeat: int) -> dict[str, Any]:
    result: dict[str, Any] = {"live": live, "gone": gone}
    workers = [_fork(_stay) for _ in range(live)]
    for _, ready, _ in workers:
        os.read(ready, 1)
    sidecar = Sidecar(directory)
    sidecar.merge()  # the first merge probes the pid namespace
    result["live_files"] = _files(directory)
    result["live_ms"] = _median_ms(sidecar.merge, repeat)
    if gone:
        for start in range(0, gone, BATCH):
            batch = [_fork(_leave) for _ in range(min(BATCH, gone - start))]
            for pid, ready, go in batch:
                os.read(ready, 1)
                os.close(ready)
                os.close(go)
                os.waitpid(pid, 0)
        result["churned_files"] = _files(directory)
        t0 = perf_counter()
        sidecar.merge()  # reaps and compacts the gone workers' files
        result["reaping_ms"] = (perf_counter() - t0) * 1000
        result["after_churn_files"] = _files(directory)
        result["after_churn_ms"] = _median_ms(sidecar.merge, repeat)
    sidecar.close()
    for pid, _ready, go in workers:
        os.write(go, b"1")
        os.waitpid(pid, 0)
    return result


if __name__ == "__main__":
    d, live_n, gone_n, rep = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(main(d, live_n, gone_n, rep)))
