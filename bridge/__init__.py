"""Passerelle: a Matrix application service for mailing lists, mailboxes and external servers."""

__version__ = "0.1.0"
