"""The legacy-system side: signed inbound webhooks (Standard Webhooks)."""
