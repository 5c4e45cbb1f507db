"""The ``cairn`` console command."""
