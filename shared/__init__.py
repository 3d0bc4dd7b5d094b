"""groundloop: execution-grounded automated AI research over an append-only event log."""

__version__ = "0.1.0"
