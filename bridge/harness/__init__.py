"""Real-server launchers (Synapse, Dovecot, PostgreSQL) shared by the tests and the demo."""
