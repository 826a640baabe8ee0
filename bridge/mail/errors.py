"""Why a mail is not bridged: one line, safe to show to room admins and in inspect-mail."""


class MailRejected(Exception):
    """The mail is refused (limits, malformed sender, policy). str() is the reason shown."""
