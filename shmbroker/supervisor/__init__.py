"""The supervisor: topic metadata, worker lifecycle, groups and committed offsets."""
