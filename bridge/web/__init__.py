"""Health and, later, provisioning and metrics endpoints."""
