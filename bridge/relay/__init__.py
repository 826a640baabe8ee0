"""The directions, side by side: where two sides meet (mail in/out, remote in/out)."""
