"""Labelled feedback on answered predictions: the store (with retention)."""
