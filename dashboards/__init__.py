"""Grafana dashboard generator, Prometheus alert rules and the PNG rendering for the pool metrics."""
