"""Small helpers shared by the tests."""

from __future__ import annotations

# One free_port for the tests and the benchmark, so the two cannot drift apart.
from bench.procs import free_port

__all__ = ["free_port"]
