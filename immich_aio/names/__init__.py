"""Which installed model answers each name a client may send, one module per task."""
