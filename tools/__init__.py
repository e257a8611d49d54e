"""Helpers shared by the tests and the benchmark: real processes on loopback."""
