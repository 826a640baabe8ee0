"""External homeservers and signed webhooks (later issues)."""
