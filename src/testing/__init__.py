"""Test-only code the suite loads into workers (never imported by the library itself)."""
