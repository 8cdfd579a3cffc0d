"""``qbsync peers``: list and forget a daemon's pinned peer keys, on a stopped or running
daemon (it works on the files; a running daemon re-reads its pins at its next handshake).

    qbsync peers destination list   [--data PATH] [--state-dir PATH]
    qbsync peers destination forget SHA256:... | --all   [--data PATH]
    qbsync peers source list        [--state-dir PATH]

The state flags are the daemon's own, with the same environment variables and defaults, so
the command finds the same directory the daemon uses.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..config import ConfigError, Role, default_state_dir, options_for
from ..wire import fingerprint
from ..wire.keys import raw_public
from .keyfile import KEY_FILE, IdentityError, load_identity
from .pins import PinStore, parse_fingerprint

EXIT_USAGE = 2

# The daemon flags that decide where its key and pins live (see keyfile.identity_dir).
STATE_FLAGS: dict[Role, tuple[str, ...]] = {
    "source": ("state_dir",),
    "destination": ("data", "state_dir"),
}


def directory_for(role: Role, values: Mapping[str, str | None], env: Mapping[str, str]) -> Path:
    """The identity directory from the daemon's own state flags (flag > env > default)."""
    resolved: dict[str, str] = {}
    for opt in options_for(role):
        if opt.name in STATE_FLAGS[role]:
            given = values.get(opt.name)
            resolved[opt.name] = given if given is not None else env.get(opt.env(role), "")
    if role == "source":
        raw = resolved.get("state_dir") or ""
        return Path(raw) if raw else default_state_dir(env)
    if resolved.get("state_dir"):
        return Path(resolved["state_dir"])
    data = resolved.get("data") or ""
    if not data:
        raise ConfigError("--data / QBSYNC_DESTINATION_DATA is required")
    return Path(data) / ".qbsync"


def repair_command(role: Role, directory: Path) -> str:
    """The ``forget`` line the daemon's logs print (``{}`` = the fingerprint)."""
    if role == "source":
        where = f"--state-dir {shlex.quote(str(directory))}"
    else:
        where = f"--data {shlex.quote(str(directory.parent))}"
        if directory.name != ".qbsync":
            where = f"--state-dir {shlex.quote(str(directory))}"
    return f"qbsync peers {role} forget {{}} {where}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qbsync peers",
        description="List or forget the peer keys a daemon has pinned (works on a stopped or "
        "a running daemon).",
    )
    roles = parser.add_subparsers(dest="role", metavar="{source,destination}", required=True)
    for role in ("source", "destination"):
        r = roles.add_parser(role, help=f"the {role} daemon's pins")
        actions = r.add_subparsers(dest="action", metavar="{list,forget}", required=True)
        for name in ("list", "forget"):
            a = actions.add_parser(
                name,
                help="show this daemon's fingerprint and its pinned peers"
                if name == "list"
                else "forget a pinned key (the next new key is then admitted again)",
            )
            if name == "forget":
                a.add_argument("fingerprint", nargs="?", help="the SHA256:... key to forget")
                a.add_argument("--all", action="store_true", help="forget every pinned key")
            for opt in options_for(role):
                if opt.name in STATE_FLAGS[role]:
                    a.add_argument(
                        opt.flag,
                        dest=opt.name,
                        default=None,
                        metavar="PATH",
                        help=f"the daemon's {opt.flag} [env {opt.env(role)}]",
                    )
    return parser


def main(argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    args = build_parser().parse_args(list(argv))
    role: Role = args.role
    values = {name: getattr(args, name, None) for name in STATE_FLAGS[role]}
    try:
        directory = directory_for(role, values, env)
    except ConfigError as exc:
        print(f"qbsync peers: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    store = PinStore(directory)
    if args.action == "list":
        own = "(no key yet: created on the daemon's first start)"
        prefix = f"QBSYNC_{role.upper()}_"
        key_text = env.get(prefix + "IDENTITY", "")
        key_file = (
            Path(env[prefix + "IDENTITY_FILE"]) if env.get(prefix + "IDENTITY_FILE") else None
        )
        if key_text or key_file is not None or (directory / KEY_FILE).exists():
            try:
                key = load_identity(
                    directory, key_text=key_text, key_file=key_file, create=False
                ).key
                own = fingerprint(raw_public(key.public_key()))
            except IdentityError as exc:
                own = f"(unreadable: {exc})"
        print(f"this {role}: {own}")
        print(f"  key and pins in {directory}")
        pins = store.pins()
        if not pins:
            print("pinned peers: none (the next peer is admitted by token or on first use)")
        for pin in pins.values():
            if pin.fingerprint.startswith("!"):
                print(f"pinned peers: {store.path} is unreadable (see the daemon's log)")
                continue
            print(
                f"  {pin.fingerprint}  {pin.role}  how={pin.how}  pinned_at={pin.pinned_at}"
                + (f"  address={pin.address}" if pin.address else "")
            )
        return 0
    if args.all == bool(args.fingerprint):
        print("qbsync peers: error: give one FINGERPRINT or --all", file=sys.stderr)
        return EXIT_USAGE
    target: str | None = None
    if args.fingerprint:
        try:
            target = parse_fingerprint(args.fingerprint)
        except ValueError as exc:
            print(f"qbsync peers: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    gone = store.forget(target)
    if target is not None and not gone:
        print(f"qbsync peers: {target} is not pinned in {store.path}", file=sys.stderr)
        return 1
    for fp in gone:
        print(f"forgot {fp}")
    if not gone:
        print("nothing was pinned")
    return 0
