"""Failure kinds every adapter maps its errors onto, so the core knows to retry or give up."""


class TransientError(Exception):
    """The other side is unreachable or overloaded: retry later, the work is not wrong."""


class PermanentError(Exception):
    """The other side refused the work: retrying the same thing will not help."""


class Ignored(Exception):
    """An expected skip: logged at DEBUG, never told to anyone."""


class Refused(Exception):
    """Remote content refused for good (limits, malformed, policy); str() can be shown."""
