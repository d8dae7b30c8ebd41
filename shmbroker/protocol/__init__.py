"""Sans-IO protocol of the local sockets: frames (frames.py) and messages (messages.py)."""
