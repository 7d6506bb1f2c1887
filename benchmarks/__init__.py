"""Side-by-side overhead benchmarks: none, ours, OpenTelemetry, hand-written hooks, no-op listeners."""
