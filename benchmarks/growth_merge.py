"""Child of benchmarks.growth's merge rows: LIVE forked workers write real multiprocess files, the sidecar merges them.

Usage: PROMETHEUS_MULTIPROC_DIR=DIR python -m benchmarks.growth_merge DIR LIVE GONE REPEAT
Prints one JSON line: the median merge with LIVE workers alive and, when GONE > 0, the one scrape
that reaps the GONE workers that came and went after them, then the steady merge. Workers are
forked as in benchmarks.sidecar_child (whose helpers this reuses); only `Sidecar(dir).merge()` is
called, so that the sidecar's internals can change under it.
"""

from __future__ import annotations

import json
import sys
from time import perf_counter
from typing import Any

from sqlalchemy_pool_exporter.sidecar.merge import Sidecar

from .sidecar_child import BATCH, churn, files, median_ms, release, start_workers

__all__ = ["BATCH", "main"]


def main(directory: str, live: int, gone: int, repeat: int) -> dict[str, Any]:
    result: dict[str, Any] = {"live": live, "gone": gone}
    workers = start_workers(live)
    sidecar = Sidecar(directory)
    sidecar.merge()  # the first merge probes the pid namespace
    result["live_files"] = files(directory)
    result["live_ms"] = median_ms(sidecar.merge, repeat)
    if gone:
        churn(gone)
        result["churned_files"] = files(directory)
        t0 = perf_counter()
        sidecar.merge()  # reaps and compacts the gone workers' files
        result["reaping_ms"] = (perf_counter() - t0) * 1000
        result["after_churn_files"] = files(directory)
        result["after_churn_ms"] = median_ms(sidecar.merge, repeat)
    sidecar.close()
    release(workers)
    return result


if __name__ == "__main__":
    d, live_n, gone_n, rep = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(main(d, live_n, gone_n, rep)))
