"""Shared memory: produce rings, partition control blocks, doorbells and their names."""
