"""Command-line scripts (run as files: ``python scripts/NAME.py``). A regular package so that
``scripts._shared`` cannot be shadowed by an installed top-level ``scripts`` package."""
