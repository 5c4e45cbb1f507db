"""Filled in by the object-store work: fixtures for the oci server."""
