"""The expert server: runs the routed experts of its placement slots for the attention workers."""
