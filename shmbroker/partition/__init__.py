"""The partition worker process: the one writer of a partition's log (worker.py)."""
