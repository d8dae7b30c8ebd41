"""Unix-socket plumbing shared by the broker's processes and the client (no protocol logic)."""
