"""The mapping database: the only place with SQL."""
