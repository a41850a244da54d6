"""Capture: hooks take errors from the caller, events are built from snapshots and scrubbed."""
