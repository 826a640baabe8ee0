"""The mail side: IMAP ingestion, MIME, SMTP outbox (next issues)."""
