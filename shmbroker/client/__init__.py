"""Producer, consumer and admin clients (import protocol, format, shm and errors only)."""
