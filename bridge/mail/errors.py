"""Why a mail is not bridged: one line, safe to show to room admins and in inspect-mail."""

from bridge.core.errors import Refused


class MailRejected(Refused):
    """The mail is refused (limits, malformed sender, policy). str() is the reason shown."""
