"""Seeing every exit: tracefs capture, stats deltas and the unified exit log."""
