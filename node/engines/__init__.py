"""Engines: one module per engine family behind the protocols of base.py."""
