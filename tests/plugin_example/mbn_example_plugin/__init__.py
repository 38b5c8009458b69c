"""Example third-party mbn plugin (see docs/plugins.md)."""
