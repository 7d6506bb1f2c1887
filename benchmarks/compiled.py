"""`python -m benchmarks.compiled`: instructions per pool cycle with a mypyc-compiled hot path.

Compiles benchmarks/hotpath_proto.py with mypyc into a temporary directory, then counts, under
callgrind, `pool.connect().close()` on a QueuePool over in-memory SQLite for: bare SQLAlchemy, the
exporter (every metric), the prototype as plain Python, and the prototype compiled. The prototype does
the pool half of the exporter's work only (no transaction timing, no holders): compare it with the
plain-Python run of the same source, not with the exporter.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("none", "ours", "proto_python", "proto_compiled")
BOUNDS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TOTALS = re.compile(rb"^totals:\s*(\d+)", re.MULTILINE)


def _child(variant: str, cycles: int, where: str) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.pool import QueuePool

    engine = create_engine("sqlite://", poolclass=QueuePool, pool_size=5, max_overflow=10)
    pool = engine.pool
    if variant == "ours":
        from prometheus_client import CollectorRegistry

        from sqlalchemy_pool_exporter import Exporter

        Exporter(CollectorRegistry()).instrument(engine, name="bench")
        pool = engine.pool
    elif variant.startswith("proto"):
        sys.path.insert(0, where)
        import hotpath_proto

        compiled = not hotpath_proto.__file__.endswith(".py")
        if compiled != (variant == "proto_compiled"):
            raise RuntimeError(f"{variant}: loaded {hotpath_proto.__file__}")
        probe = hotpath_proto.Probe(pool, BOUNDS)
        pool.connect = probe.connect  # type: ignore[method-assign]
        pool._return_conn = probe.return_conn  # type: ignore[method-assign]
    for _ in range(300):
        pool.connect().close()
    subprocess.run(["callgrind_control", "-i", "on", str(os.getpid())], check=True, capture_output=True)
    for _ in range(20):
        pool.connect().close()
    os.getppid()
    for _ in range(cycles):
        pool.connect().close()
    os.getppid()


def compile_proto(into: Path) -> Path:
    """mypyc-compile the prototype into `into/compiled`, and copy its source to `into/python`."""
    compiled, python = into / "compiled", into / "python"
    compiled.mkdir()
    python.mkdir()
    source = ROOT / "benchmarks" / "hotpath_proto.py"
    shutil.copy(source, compiled / source.name)
    shutil.copy(source, python / source.name)
    mypyc = Path(sys.executable).parent / "mypyc"
    subprocess.run([str(mypyc), source.name], cwd=compiled, check=True, capture_output=True)
    (compiled / source.name).unlink()  # only the extension module is left to import
    return into


def count(variant: str, cycles: int, where: Path) -> float:
    folder = where / ("compiled" if variant == "proto_compiled" else "python")
    out = where / f"{variant}.out"
    cmd = [
        "setarch", platform.machine(), "-R", "valgrind", "--tool=callgrind", "--instr-atstart=no",
        "--dump-before=getppid", f"--callgrind-out-file={out}", sys.executable, "-m", "benchmarks.compiled",
        "--child", variant, str(cycles), str(folder),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=where)
    found = _TOTALS.search((where / f"{out.name}.2").read_bytes())
    if found is None:
        raise RuntimeError(f"no totals for {variant}")
    return int(found.group(1)) / cycles


def main(cycles: int = 1000) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-mypyc-") as tmp:
        where = compile_proto(Path(tmp))
        irs = {v: count(v, cycles, where) for v in VARIANTS}
    base = irs["none"]
    print("| pool cycle | Ir | over bare |")
    print("| --- | --- | --- |")
    for variant, ir in irs.items():
        print(f"| {variant} | {ir:,.0f} | {ir - base:+,.0f} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        main()
