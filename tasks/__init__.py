"""Prefect tasks: build, trace, pack, deploy runtimes, load test, report. Thin wrappers over
domain code that also runs without a Prefect server."""
