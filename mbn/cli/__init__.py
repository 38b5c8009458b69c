"""Command-line entry points: ``mbn-train`` and ``mbn-eval``."""
