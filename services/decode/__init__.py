"""`tandem serve decode`: generation from handed-over KV caches, streamed back to the gateway."""
