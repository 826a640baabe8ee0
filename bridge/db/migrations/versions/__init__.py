"""Numbered migrations, applied in order at start-up."""
