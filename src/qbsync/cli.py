"""The ``qbsync`` command: ``qbsync source`` and ``qbsync destination`` (and the tools:
``demo``, ``status``, ``peers``, and ``doctor`` with either daemon's flags).

Flags, environment variables and defaults all come from :mod:`qbsync.config`; this module only
turns them into argparse flags, prints ``--print-config`` and hands the resolved configuration
to the role's runner. Exit status: 0 on a clean stop, 1 when the daemon fails at run time,
2 for a usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from . import __version__
from .config import (
    REPEATABLE,
    Config,
    ConfigError,
    Option,
    Role,
    options_for,
    redacted,
    resolve,
)

EXIT_CONFIG = 2

_DESCRIPTIONS: dict[Role, str] = {
    "source": "Stream pieces from the source qBittorrent to a qbsync destination as they finish.",
    "destination": "Receive pieces, verify them, and add verified torrents to qBittorrent.",
}


_TOOLS = {
    "demo": "Sync a sample torrent between throwaway qBittorrents on 127.0.0.1 and show it",
    "status": "Show a daemon's /status as a table (qbsync status --help)",
    "doctor": "Check a daemon's set-up with its own flags, one verdict and fix per check "
    "(qbsync doctor source|destination --help)",
    "peers": "List or forget a daemon's pinned peer keys (qbsync peers --help)",
}


def _add_option(parser: argparse.ArgumentParser, role: Role, opt: Option) -> None:
    default = f"(default: {opt.default})" if opt.default else "(default: empty)"
    if opt.required:
        default = "(required)"
    help_text = f"{opt.help} [env {opt.env(role)}] {default}"
    if opt.is_flag:
        # "--dry-run" alone means true; "--dry-run=false" is accepted too, like Go's flag package.
        parser.add_argument(
            opt.flag,
            dest=opt.name,
            nargs="?",
            const="true",
            default=None,
            metavar="BOOL",
            help=help_text,
        )
    else:
        parser.add_argument(
            opt.flag,
            dest=opt.name,
            default=None,
            action="append" if opt.name in REPEATABLE else "store",
            metavar=opt.metavar or "N"
            if opt.parse.__name__ in ("_parse_int", "_parse_float")
            else opt.metavar or "VALUE",
            help=help_text.replace("%", "%%"),
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qbsync",
        description="Sync torrents between two qBittorrent instances, piece by piece.",
    )
    parser.add_argument("--version", action="version", version=f"qbsync {__version__}")
    sub = parser.add_subparsers(
        dest="role", metavar="{source,destination,demo,status,peers,doctor}"
    )
    sub.required = True
    for role in ("source", "destination"):
        p = sub.add_parser(
            role,
            help=_DESCRIPTIONS[role],
            description=_DESCRIPTIONS[role]
            + f" Every flag can also be set with the environment variable shown "
            f"(prefix QBSYNC_{role.upper()}_); a flag wins over the environment.",
        )
        for opt in options_for(role):
            _add_option(p, role, opt)
        p.add_argument(
            "--print-config",
            action="store_true",
            help='Print the resolved configuration as JSON (secrets as "***") and exit',
        )
    # Listed here for --help; main() hands their arguments to their own parsers.
    for name, text in _TOOLS.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def build_doctor_parser() -> argparse.ArgumentParser:
    """``qbsync doctor source|destination``: the role's own flags (and environment)."""
    parser = argparse.ArgumentParser(
        prog="qbsync doctor",
        description="Check what a daemon needs, with exactly its flags and environment: "
        "qBittorrent (reachable, credentials, Web API version), --data (exists, writable, "
        "filesystem, xattrs, free space), the state directory (owner, mode), the peer (the "
        "destination reachable and its handshake accepted; for a destination, --listen "
        "bindable), the clock, and the authentication mode. One line per check with a fix. "
        "Changes nothing. Exit 0 when no check fails, 1 when one does, 2 for a usage error.",
    )
    sub = parser.add_subparsers(dest="role", metavar="{source,destination}")
    sub.required = True
    for role in ("source", "destination"):
        p = sub.add_parser(
            role,
            help=f"Check a qbsync {role}'s set-up (takes the same flags as qbsync {role})",
            description=f"Check a qbsync {role}'s set-up. Every flag and environment variable "
            f"of `qbsync {role}` applies (prefix QBSYNC_{role.upper()}_).",
        )
        for opt in options_for(role):
            _add_option(p, role, opt)
    return parser


def _flags(args: argparse.Namespace, role: Role) -> dict[str, str | None]:
    flags = {opt.name: getattr(args, opt.name) for opt in options_for(role)}
    for name in REPEATABLE & flags.keys():  # a repeated flag is one comma-separated list
        if flags[name] is not None:
            flags[name] = ",".join(flags[name])
    return flags


def _resolved(args: argparse.Namespace, prog: str) -> Config | None:
    """The configuration the parsed flags and the environment give, or None once the error is
    printed as ``<prog> <role>: error: ...`` (the caller then exits with EXIT_CONFIG)."""
    role: Role = args.role
    try:
        return resolve(role, _flags(args, role))
    except ConfigError as exc:
        print(f"{prog} {role}: error: {exc}", file=sys.stderr)
        return None


def doctor_main(argv: Sequence[str]) -> int:
    config = _resolved(build_doctor_parser().parse_args(list(argv)), "qbsync doctor")
    if config is None:
        return EXIT_CONFIG
    from . import doctor

    return doctor.run(config)


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["doctor"]:
        return doctor_main(args_list[1:])
    if args_list[:1] == ["demo"]:
        from .demo import run as demo

        return demo.main(args_list[1:])
    if args_list[:1] == ["status"]:
        from .http import status

        return status.main(args_list[1:])
    if args_list[:1] == ["peers"]:
        from .identity import command

        return command.main(args_list[1:])
    parser = build_parser()
    args = parser.parse_args(args_list)
    role: Role = args.role
    config = _resolved(args, "qbsync")
    if config is None:
        return EXIT_CONFIG
    if args.print_config:
        print(json.dumps(redacted(config), indent=2, sort_keys=True))
        return 0

    from . import log

    log.setup(config.log_level, role)
    if role == "source":
        from .config import SourceConfig
        from .source.runner import run as run_source

        assert isinstance(config, SourceConfig)
        return run_source(config)
    from .config import DestinationConfig
    from .destination.runner import run as run_destination

    assert isinstance(config, DestinationConfig)
    return run_destination(config)


if __name__ == "__main__":
    sys.exit(main())
