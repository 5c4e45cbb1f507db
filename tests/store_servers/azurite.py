"""Filled in by the object-store work: fixtures for the azurite server."""
