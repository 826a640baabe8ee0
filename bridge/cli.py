"""The `passerelle` command: run, generate-registration, check-config, backfill, inspect-mail,
inspect-event, inspect-remote, audit, demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from bridge import __version__
from bridge.config import Config, ConfigError, LoggingConfig, load_config

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_CONFIG = 10
EXIT_DATABASE = 11
EXIT_STARTUP = 12
EXIT_LEASE_LOST = 13  # several instances: a lease was lost, the instance stopped (restart it)

log = logging.getLogger("passerelle")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="passerelle",
        description="Passerelle: a Matrix bridge to mailing lists, mailboxes and other servers.",
    )
    parser.add_argument("--version", action="version", version=f"passerelle {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def with_config(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument(
            "-c", "--config", type=Path, default=Path("config.yaml"), help="config file"
        )
        return p

    with_config("run", "run the bridge")
    gen = with_config(
        "generate-registration",
        "create the appservice registration file for the homeserver (fills in missing tokens)",
    )
    gen.add_argument(
        "-r",
        "--registration",
        type=Path,
        default=Path("registration.yaml"),
        help="where to write the registration",
    )
    with_config("check-config", "validate the config and exit")
    back = with_config(
        "backfill",
        "post a linked list's existing mail into its room, oldest first (resumable)",
    )
    back.add_argument("--link", required=True, help="the linked list (its address)")
    since_or_last = back.add_mutually_exclusive_group()
    since_or_last.add_argument("--since", default=None, help="only mail since this date")
    since_or_last.add_argument("--last", default=None, help="only the last N mails")
    insp = sub.add_parser(
        "inspect-mail",
        help="show, as JSON, what the bridge would post for a mail (touches no server)",
        description="Parse MESSAGE (an .eml file) as the bridge would and print one JSON "
        "document: accepted, reason, sender, auth (the sender's verdict and its evidence) "
        "and the Matrix events it would send. Exit 0 for any mail, accepted or not.",
    )
    insp.add_argument("-c", "--config", type=Path, default=None, help="config file (optional)")
    insp.add_argument(
        "--link",
        default=None,
        help="apply this link's policy (its address; a link of the config, else one made in a "
        "room, read from the database)",
    )
    insp.add_argument("message", type=Path, help="the mail, as an .eml file")
    ev = sub.add_parser(
        "inspect-event",
        help="print the mail a Matrix event would become, touching no server",
        description="Print to stdout the exact RFC 5322 message the bridge would send for a "
        "Matrix event (or one line 'not sent: <reason>'). No server or database is used: "
        "In-Reply-To/References (which come from the database) are left out and files become "
        "placeholder parts. Exit 0 either way.",
    )
    ev.add_argument("-c", "--config", type=Path, default=None, help="config file (optional)")
    ev.add_argument("--link", default=None, help="compose for this link (its list address)")
    ev.add_argument(
        "--sender-name", default=None, help="the sender's room display name (default: MXID)"
    )
    ev.add_argument("event", type=Path, help="the event, as JSON (a whole event, not content)")
    rem = sub.add_parser(
        "inspect-remote",
        help="show, as JSON, what the bridge would post for an event of a remote room "
        "(touches no server)",
        description="Read EVENT (one event as the remote's /sync returns it, as JSON), apply "
        "the policy of remotes.NAME in the config, and print one JSON document: accepted, "
        "reason, ghost (user_id, displayname) and the Matrix events the relay would send. "
        "Offline, nothing is mapped: replies, threads and edits point to events taken as never "
        "relayed (so the message shows plainly), a reaction becomes the notice sent for an "
        "unknown message, a redaction is not accepted, and files get the placeholder URL "
        "mxc://inspect/1. The sender's name in the remote room is unknown, so a message's "
        "ghost is named by the user ID's localpart (a member event's own displayname is "
        "used); for a leave, displayname is null. Exit 0 for any event, accepted or not; 2 for "
        "an unknown remote or an unreadable file; 10 for a config error.",
    )
    rem.add_argument(
        "-c", "--config", type=Path, default=None, help="config file (holds the remotes)"
    )
    rem.add_argument(
        "--remote", required=True, metavar="NAME", help="apply the policy of remotes.NAME"
    )
    rem.add_argument(
        "event", type=Path, metavar="EVENT", help="the event, as JSON (a whole event, not content)"
    )
    _audit_parser(sub)
    demo = sub.add_parser(
        "demo",
        help="start local Synapses, mail and the bridge, and show how to log in",
        description="Start a local Synapse (127.0.0.1) with Passerelle registered, a mail "
        "server and a second Synapse for another ministry; create demo users, check a linked "
        "list and a linked remote room both ways, and keep it all running until Ctrl-C.",
    )
    demo.add_argument("--dir", type=Path, default=Path("demo-data"), help="state folder")
    demo.add_argument(
        "--check",
        action="store_true",
        help="exit after the bot has answered instead of staying up",
    )
    return parser


def _audit_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = sub.add_parser(
        "audit",
        help="export or verify the audit log",
        description="The audit log: one hash-chained row per relayed or refused item.",
    )
    actions = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)
    config_help = "config file (its database is read)"
    exp = actions.add_parser(
        "export",
        help="write the rows as JSON Lines",
        description="Write the audit rows, oldest first, one JSON object a line (seq, time "
        "in ISO-8601 UTC, every field, prev_hash and hash).",
    )
    exp.add_argument("-c", "--config", type=Path, default=Path("config.yaml"), help=config_help)
    exp.add_argument("--since", default=None, help="only rows from this date or time (UTC)")
    exp.add_argument("--link", default=None, help="only rows of this link (its address/key)")
    exp.add_argument("-o", "--output", type=Path, default=None, help="file (default: stdout)")
    ver = actions.add_parser(
        "verify",
        help="check the hash chain",
        description="Check every row's hash and its link to the previous row, and the end "
        "of the chain against the stored head. Exit 0 and print the count when intact; exit "
        "1 naming the first row (seq) that was changed, removed or inserted.",
    )
    ver.add_argument("-c", "--config", type=Path, default=Path("config.yaml"), help=config_help)
    ver.add_argument(
        "--anchor",
        action="append",
        default=[],
        metavar="SEQ:HASH",
        help="a head printed by an earlier verify and kept elsewhere: that row must still "
        "have that hash (catches a chain rewritten whole); repeatable",
    )


def _audit(args: argparse.Namespace) -> int:
    from bridge.audit_cli import run_export, run_verify
    from bridge.db.engine import DatabaseError

    config = _load(args.config, require_tokens=False)
    try:
        if args.audit_command == "export":
            return asyncio.run(run_export(config, args.output, args.since, args.link))
        return asyncio.run(run_verify(config, args.anchor))
    except ValueError as e:
        return _fail(EXIT_USAGE, "usage", str(e))
    except DatabaseError as e:
        return _fail(EXIT_DATABASE, "database", str(e))


def _fail(code: int, kind: str, message: str) -> int:
    print(f"passerelle: {kind}: {message}", file=sys.stderr)
    return code


def _load(path: Path, *, require_tokens: bool = True) -> Config:
    config = load_config(path, require_tokens=require_tokens)
    return config


def _setup_logging(config: Config) -> None:
    from bridge.logsetup import setup_logging

    setup_logging(config.logging, config.secrets())
    for warning in config.warnings:
        log.warning("config: %s", warning)
    for key in config.env_overrides:
        log.info("config: %s set from the environment", key)


def _run(args: argparse.Namespace) -> int:
    from bridge.app import LeaseLostError, StartupError, run_until_signalled
    from bridge.db.engine import DatabaseError

    config = _load(args.config)
    _setup_logging(config)
    try:
        asyncio.run(run_until_signalled(config))
    except DatabaseError as e:
        return _fail(EXIT_DATABASE, "database", str(e))
    except StartupError as e:
        return _fail(EXIT_STARTUP, "startup", str(e))
    except LeaseLostError as e:
        return _fail(EXIT_LEASE_LOST, "lease", str(e))
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def _backfill(args: argparse.Namespace) -> int:
    import datetime as dt

    from bridge.backfill_cli import UsageError, run_backfill, selection_from
    from bridge.db.engine import DatabaseError
    from bridge.logsetup import setup_logging

    config = _load(args.config)
    # The progress bar owns the terminal: only warnings there (the log file, if any, as set).
    setup_logging(
        LoggingConfig(level="WARNING", loggers={}, file=config.logging.file), config.secrets()
    )
    try:
        selection = selection_from(args.since, args.last, today=dt.datetime.now(dt.UTC).date())
        return asyncio.run(run_backfill(config, args.link, selection))
    except UsageError as e:
        return _fail(EXIT_USAGE, "usage", str(e))
    except DatabaseError as e:
        return _fail(EXIT_DATABASE, "database", str(e))
    except KeyboardInterrupt:
        print("Interrupted: the same command resumes where it stopped.", file=sys.stderr)
        return 130


def _generate(args: argparse.Namespace) -> int:
    from bridge.registration import generate_registration

    config, generated = generate_registration(args.config, args.registration)
    if generated:
        print(f"Generated {' and '.join(generated)} and saved them in {args.config}.")
    print(f"Wrote {args.registration}. Add it to Synapse's app_service_config_files")
    print(f"and restart Synapse; then run: passerelle run -c {args.config}")
    del config
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    config = _load(args.config)
    for warning in config.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(
        f"{args.config}: ok (bot {config.bot_mxid}, database {config.database.url.split(':')[0]})"
    )
    return EXIT_OK


def _inspect_mail(args: argparse.Namespace) -> int:
    from bridge.inspect import offline_config, run_inspect

    config = load_config(args.config, require_tokens=False) if args.config else offline_config()
    if not args.message.is_file():
        return _fail(EXIT_USAGE, "usage", f"{args.message}: no such file")
    try:
        print(run_inspect(config, args.message, args.link))
    except LookupError as e:
        return _fail(EXIT_USAGE, "usage", str(e).strip("'\""))
    return EXIT_OK


def _inspect_event(args: argparse.Namespace) -> int:
    from bridge.inspect import inspect_event, offline_config

    config = load_config(args.config, require_tokens=False) if args.config else offline_config()
    if not args.event.is_file():
        return _fail(EXIT_USAGE, "usage", f"{args.event}: no such file")
    try:
        event = json.loads(args.event.read_bytes())
    except (ValueError, RecursionError) as e:
        return _fail(EXIT_USAGE, "usage", f"{args.event}: not JSON ({str(e)[:100]})")
    if not isinstance(event, dict):
        return _fail(EXIT_USAGE, "usage", f"{args.event}: must hold one event (a JSON object)")
    try:
        raw = inspect_event(
            config,
            event,
            link=args.link,
            sender_name=args.sender_name,
            configured=args.config is not None,
        )
    except LookupError as e:
        return _fail(EXIT_USAGE, "usage", str(e).strip("'\""))
    sys.stdout.flush()
    sys.stdout.buffer.write(raw)
    sys.stdout.buffer.flush()
    return EXIT_OK


def _inspect_remote(args: argparse.Namespace) -> int:
    from bridge.inspect import offline_config, remote_settings, run_inspect_remote
    from bridge.remote.client import SYNC_MAX_BYTES

    config = load_config(args.config, require_tokens=False) if args.config else offline_config()
    try:
        remote_settings(config, args.remote)
    except LookupError as e:
        return _fail(EXIT_USAGE, "usage", str(e).strip("'\""))
    if not args.event.is_file():
        return _fail(EXIT_USAGE, "usage", f"{args.event}: no such file")
    try:
        with args.event.open("rb") as f:
            raw = f.read(SYNC_MAX_BYTES + 1)  # one byte more says it is too large
    except OSError as e:
        return _fail(EXIT_USAGE, "usage", f"{args.event}: {e.strerror or e}")
    print(run_inspect_remote(config, args.remote, raw))
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from bridge.demo import run_demo

    _setup_logging_plain()
    return run_demo(args.dir, check_only=args.check)


def _setup_logging_plain() -> None:
    from bridge.logsetup import setup_logging

    setup_logging(LoggingConfig(level="WARNING", loggers={"passerelle": "INFO"}, file=None))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {
        "run": _run,
        "generate-registration": _generate,
        "check-config": _check,
        "backfill": _backfill,
        "inspect-mail": _inspect_mail,
        "inspect-event": _inspect_event,
        "inspect-remote": _inspect_remote,
        "audit": _audit,
        "demo": _demo,
    }
    try:
        return handlers[args.command](args)
    except ConfigError as e:
        return _fail(EXIT_CONFIG, "config error", str(e))
    except OSError as e:
        return _fail(EXIT_CONFIG, "file error", f"{e.filename or ''}: {e.strerror or e}")


if __name__ == "__main__":
    sys.exit(main())
