"""Clients for `molmo serve` (see molmo_client.py and example.py)."""
