"""Artifact store, model loading and backends, the Litestar model server, router and client."""
