"""Prefect flows that chain the tasks, and the ``myriad`` command line."""
