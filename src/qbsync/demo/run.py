"""``qbsync demo``: watch qbsync stream a torrent between two real qBittorrents, on this machine.

A new user's first question is "does it work, and what does it look like?". Answering it by
hand means setting up two qBittorrent instances, a torrent and a peer to download it from.
The demo does all of that in a temporary directory, on 127.0.0.1 only:

1. writes a few hundred MiB of random data in several files and a trackerless ``.torrent``
   of it (:func:`qbsync.torrent.create_metainfo`);
2. starts three throwaway ``qbittorrent-nox`` instances (:mod:`qbsync.qbittorrent.instance`): a
   *seeder* that has the data, the *source* that downloads it from the seeder (throttled, so
   the streaming is visible for about ``--duration`` seconds) and the *destination*;
3. runs the real ``qbsync destination`` and ``qbsync source`` processes with a generated token;
4. shows live progress (downloaded on the source, streamed and verified on the destination,
   rate, lag) until the destination's qBittorrent has verified the whole torrent;
5. compares every file on the destination with the original byte for byte, prints a summary
   and stops every process it started, by PID.

Exit status 0 only when the destination copy is verified by qBittorrent *and* identical;
1 otherwise, 2 for a usage or set-up problem (e.g. qbittorrent-nox missing), 130 on Ctrl-C.
``--keep`` leaves everything running and prints the addresses instead of stopping.

Nothing it starts is an open door while it runs (or after ``--keep``): each qBittorrent WebUI
has its own generated password, CSRF protection and Host-header validation on and no
localhost bypass, so no web page the user visits and no other local account can drive it
(``setPreferences`` can set ``autorun_program``, a command run on every completion). The
token and the passwords reach the daemons through their environment, never their argv
(``ps`` shows every argv to every local user); the passwords are also written to a 0600
``credentials`` file in the work directory, for ``--keep``.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

import attrs

from ..config import parse_size
from ..interrupt import interruptible
from ..qbittorrent.instance import QBInstance, free_port, make_payload, stop_process
from ..torrent import create_metainfo, parse_metainfo

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

MiB = 1024 * 1024
NAME = "qbsync-demo"
PEER_NUDGE_INTERVAL = 5.0  # seconds between re-adding the seeder while none is connected


class DemoError(Exception):
    """The demo cannot go on; the message says why (shown without a traceback)."""


@attrs.frozen
class Options:
    size: int = 300 * MiB
    files: int = 4
    duration: float = 30.0  # seconds the throttled source download should take; 0 = no limit
    piece_size: int = 256 * 1024
    keep: bool = False
    workdir: Path | None = None
    timeout: float = 600.0
    plain: bool | None = None  # None: progress bars on a terminal, plain lines otherwise


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qbsync demo",
        description="Start a seeder, a source and a destination qBittorrent on 127.0.0.1 in a "
        "temporary directory, sync a sample torrent with real qbsync daemons and show it "
        "happen. Needs qbittorrent-nox.",
    )
    p.add_argument("--size", default="300M", help="Total size of the sample torrent (default 300M)")
    p.add_argument("--files", type=int, default=4, help="Number of files (default 4)")
    p.add_argument(
        "--duration",
        type=float,
        default=30.0,
        help="Seconds the source's throttled download should take (0 = unthrottled; default 30)",
    )
    p.add_argument("--piece-size", default="256K", help="Piece size (default 256K)")
    p.add_argument(
        "--keep",
        action="store_true",
        help="Leave everything running at the end and print the WebUI and status addresses",
    )
    p.add_argument(
        "--dir", type=Path, default=None, help="Work directory (default: a new temp dir)"
    )
    p.add_argument("--timeout", type=float, default=600.0, help="Give up after this many seconds")
    p.add_argument(
        "--plain", action="store_true", default=None, help="Plain progress lines even on a terminal"
    )
    return p


def parse_options(argv: Sequence[str]) -> Options:
    args = build_parser().parse_args(list(argv))
    try:
        size = parse_size(args.size)
        piece = parse_size(args.piece_size)
    except ValueError as exc:
        raise DemoError(str(exc)) from None
    if args.files < 1 or size < args.files:
        raise DemoError("--files must be at least 1 and --size at least one byte per file")
    if piece < 16 * 1024 or piece & (piece - 1):
        raise DemoError("--piece-size must be a power of two of at least 16K")
    return Options(
        size=size,
        files=args.files,
        duration=max(0.0, args.duration),
        piece_size=piece,
        keep=args.keep,
        workdir=args.dir,
        timeout=args.timeout,
        plain=args.plain,
    )


def main(argv: Sequence[str]) -> int:
    try:
        opts = parse_options(argv)
    except DemoError as exc:
        print(f"qbsync demo: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    binary = shutil.which(QBInstance.binary)
    if binary is None:
        print(
            "qbsync demo: error: qbittorrent-nox is not installed. On Debian/Ubuntu run "
            "`sudo apt-get install qbittorrent-nox` (or `make demo` as root, which installs it).",
            file=sys.stderr,
        )
        return EXIT_USAGE
    demo = Demo(opts)
    # Ctrl-C, SIGTERM and SIGHUP clean up alike, also when SIGINT was inherited ignored (a
    # background job of a script): see qbsync.interrupt.
    with interruptible((signal.SIGINT, signal.SIGTERM, signal.SIGHUP)):
        try:
            return demo.run()
        except KeyboardInterrupt:
            demo.say("interrupted: stopping everything the demo started")
            return EXIT_INTERRUPTED
        except DemoError as exc:
            demo.say(f"demo failed: {exc}")
            demo.show_logs()
            return EXIT_FAILED
        finally:
            if not demo.kept:
                demo.stop_all()  # a second Ctrl-C does not interrupt this (interrupt.py)


# ---------------------------------------------------------------------------------------------


def demo_qbittorrent(name: str, root: Path) -> QBInstance:
    """One of the demo's qBittorrents, not yet started: its own generated WebUI password and
    the WebUI's CSRF, Host-header and login checks on (``hardened``); in its own session, so
    a terminal's Ctrl-C reaches only the demo, which stops it by PID."""
    inst = QBInstance(name, root, start=False, password=secrets.token_urlsafe(18), hardened=True)
    inst.new_session = True
    return inst


class Daemon:
    """A ``qbsync`` subprocess of the demo, in its own session so Ctrl-C reaches only the demo
    (which then stops the daemons in order) and ``--keep`` can leave it running."""

    def __init__(
        self, role: str, args: list[str], log_path: Path, secrets_env: Mapping[str, str]
    ) -> None:
        self.role = role
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("QBSYNC_")}
        env["PYTHONUNBUFFERED"] = "1"
        env.update(secrets_env)  # token and passwords: never on the argv
        self._out: IO[bytes] | None = open(log_path, "ab")  # noqa: SIM115  # closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qbsync.cli", role, *args],
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> int:
        code = stop_process(self.proc, 30.0)
        if self._out is not None:
            self._out.close()
            self._out = None
        return code


@attrs.define
class Snapshot:
    """One observation of the sync, for the progress display."""

    elapsed: float
    size: int
    pieces: int
    source_bytes: int  # downloaded by the source qBittorrent
    source_rate: float  # bytes/s
    streamed: int  # pieces written on the destination
    verified: int  # pieces acknowledged as verified by the destination
    state: str


class Display(Protocol):
    def update(self, snap: Snapshot) -> None: ...

    def close(self) -> None: ...


class PlainDisplay:
    """One line every couple of seconds, for logs and pipes."""

    def __init__(self, name: str, out: IO[str], every: float = 2.0) -> None:
        self.name = name
        self.out = out
        self.every = every
        self._last = -1e9

    def update(self, snap: Snapshot) -> None:
        if snap.elapsed - self._last < self.every and snap.state != "verified":
            return
        self._last = snap.elapsed
        self.out.write(_plain_line(self.name, snap) + "\n")
        self.out.flush()

    def close(self) -> None:
        pass


def _plain_line(name: str, s: Snapshot) -> str:
    pct = 100.0 * s.source_bytes / s.size if s.size else 0.0
    return (
        f"[{s.elapsed:5.1f}s] {name}: source {pct:5.1f}% "
        f"{s.source_bytes / MiB:.0f}/{s.size / MiB:.0f} MiB at {s.source_rate / MiB:.1f} MiB/s | "
        f"destination streamed {s.streamed}/{s.pieces} verified {s.verified}/{s.pieces} pieces "
        f"| lag {max(0, _source_pieces(s) - s.verified)} pieces | {s.state}"
    )


def _source_pieces(s: Snapshot) -> int:
    return min(s.pieces, s.source_bytes * s.pieces // s.size) if s.size else 0


class RichDisplay:
    """Progress bars (``rich``) on a terminal: one bar per side of the torrent."""

    def __init__(self, name: str) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]{task.description:<26}"),
            BarColumn(bar_width=None),
            TextColumn("{task.percentage:>5.1f}%"),
            DownloadColumn(binary_units=True),
            TextColumn("{task.fields[extra]}"),
            TimeElapsedColumn(),
            console=Console(stderr=False),
            expand=True,
        )
        self.source = self.progress.add_task(f"{name}: source ↓", total=1, extra="")
        self.dest = self.progress.add_task("destination ✓ verified", total=1, extra="")
        self.progress.start()

    def update(self, snap: Snapshot) -> None:
        piece = snap.size / snap.pieces if snap.pieces else 0
        self.progress.update(
            self.source,
            total=snap.size,
            completed=snap.source_bytes,
            extra=f"{snap.source_rate / MiB:5.1f} MiB/s",
        )
        lag = max(0, _source_pieces(snap) - snap.verified)
        self.progress.update(
            self.dest,
            total=snap.size,
            completed=min(snap.size, int(snap.verified * piece)),
            extra=f"streamed {snap.streamed}/{snap.pieces}  lag {lag} pcs  {snap.state}",
        )

    def close(self) -> None:
        self.progress.stop()


# ---------------------------------------------------------------------------------------------


class Demo:
    def __init__(self, opts: Options, out: IO[str] | None = None) -> None:
        self.opts = opts
        self.out = out or sys.stdout
        self.kept = False
        self.remove_workdir = False
        self.qbs: list[QBInstance] = []
        self.daemons: list[Daemon] = []
        self.token = secrets.token_hex(16)
        self.root = Path()

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def run(self) -> int:
        o = self.opts
        if o.workdir is not None:
            o.workdir.mkdir(parents=True, exist_ok=True)
            self.root = Path(tempfile.mkdtemp(prefix=f"{NAME}-", dir=o.workdir))
        else:
            self.root = Path(tempfile.mkdtemp(prefix=f"{NAME}-"))
        self.say(f"qbsync demo: working in {self.root}")
        started = time.monotonic()

        # 1. The sample data and its torrent.
        seeder_dir = self.root / "seeder"
        payload = self._make_payload(seeder_dir / "downloads" / NAME)
        torrent = create_metainfo(payload, o.piece_size)
        meta = parse_metainfo(torrent)
        info_hash = meta.info_hash
        pieces = meta.geometry.num_pieces
        self.say(
            f"made {NAME}: {o.files} files, {o.size / MiB:.1f} MiB, {pieces} pieces of "
            f"{o.piece_size // 1024} KiB, info-hash {info_hash}"
        )

        # 2. Three qBittorrents on 127.0.0.1.
        seeder = self._qb("seeder", seeder_dir)
        source = self._qb("source", self.root / "source")
        dest = self._qb("destination", self.root / "destination")
        self._add(seeder, torrent, info_hash)
        seeder.wait_seeding(info_hash, timeout=max(60.0, o.size / (20 * MiB)))
        self.say(f"seeder {seeder.url} is seeding")

        # 3. The two qbsync daemons.
        wire_port, dest_health, src_health = free_port(), free_port(), free_port()
        self._daemon(
            "destination",
            [
                "--data", str(dest.save_path),
                "--listen", f"127.0.0.1:{wire_port}",
                *dest.qbsync_args(password_in_env=True),
                "--health-addr", f"127.0.0.1:{dest_health}",
                "--poll-interval", "0.5",
            ],
            "event=destination_ready",
            dest,
        )  # fmt: skip
        self._daemon(
            "source",
            [
                "--data", str(source.save_path),
                *source.qbsync_args(password_in_env=True),
                "--destination-addr", f"127.0.0.1:{wire_port}",
                "--state-dir", str(self.root / "source-state"),
                "--health-addr", f"127.0.0.1:{src_health}",
                "--sleep", "1",
                "--min-connections", "2",
                "--max-connections", "4",
            ],
            "event=started",
            source,
        )  # fmt: skip
        self.say(
            f"qbsync destination status http://127.0.0.1:{dest_health}/ , "
            f"source status http://127.0.0.1:{src_health}/"
        )

        # 4. Download on the source, throttled so the streaming is visible.
        limit = int(o.size / o.duration) if o.duration > 0 else 0
        self._add(source, torrent, info_hash, download_limit=limit or None)
        source.api.torrents_add_peers(peers=f"127.0.0.1:{seeder.bt_port}", torrent_hashes=info_hash)
        if limit:
            self.say(f"source downloads from the seeder at {limit / MiB:.1f} MiB/s")
        sync_started = time.monotonic()
        self._watch(seeder, source, dest, info_hash, pieces, src_health, dest_health, sync_started)
        sync_seconds = time.monotonic() - sync_started

        # 5. Check the copy byte for byte.
        copy = dest.save_path / meta.name
        compared, mismatched = compare_trees(payload, copy)
        verified = self._verified_on_destination(dest, info_hash)
        self.say("")
        self.say("summary")
        self.say(f"  torrent          {meta.name} ({info_hash})")
        self.say(f"  bytes            {o.size} ({o.size / MiB:.1f} MiB) in {pieces} pieces")
        self.say(
            f"  time             {sync_seconds:.1f} s from adding the torrent on the source to "
            f"the destination verified ({time.monotonic() - started:.1f} s with set-up)"
        )
        self.say(
            f"  verified         {'yes' if verified else 'NO'} (every piece SHA-1-checked on "
            "arrival; the destination qBittorrent holds it at 100%, tagged synced)"
        )
        self.say(
            f"  files compared   {compared - len(mismatched)}/{compared} identical byte for byte"
            + (f"; DIFFERENT: {', '.join(mismatched)}" if mismatched else "")
        )
        ok = verified and not mismatched and compared == o.files
        self.say(f"  result           {'OK' if ok else 'FAILED'}")
        if o.keep:
            self._keep(seeder, source, dest, src_health, dest_health)
        elif ok:
            self.remove_workdir = True
        else:
            self.say(f"  files and logs kept in {self.root}")
        return EXIT_OK if ok else EXIT_FAILED

    # -- steps ---------------------------------------------------------------------------

    def _make_payload(self, root: Path) -> Path:
        o = self.opts
        base, extra = divmod(o.size, o.files)
        sizes = {}
        for i in range(o.files):
            rel = f"part-{i + 1:02d}.bin" if i % 2 == 0 else f"extras/part-{i + 1:02d}.bin"
            sizes[rel] = base + (1 if i < extra else 0)
        return make_payload(root, sizes, seed=secrets.randbits(32))

    def _qb(self, name: str, root: Path) -> QBInstance:
        inst = demo_qbittorrent(name, root)
        self.qbs.append(inst)
        inst.start()
        self._write_credentials()  # once its port is known
        self.say(f"qBittorrent {name} started (pid {inst.pid}, WebUI {inst.url})")
        return inst

    def _add(
        self, inst: QBInstance, torrent: bytes, info_hash: str, download_limit: int | None = None
    ) -> None:
        kwargs: dict[str, Any] = {}
        if download_limit is not None:
            kwargs["download_limit"] = download_limit
        result = inst.api.torrents_add(
            torrent_files={f"{info_hash}.torrent": torrent},
            save_path=str(inst.save_path),
            **kwargs,
        )
        if result != "Ok.":
            raise DemoError(f"{inst.name} qBittorrent refused the torrent: {result!r}")

    def _write_credentials(self) -> None:
        """The WebUI passwords, for a user who keeps the demo running: a 0600 file (created
        with that mode, never world-readable for a moment), not the terminal or a log. It is
        rewritten as each instance is added: the demo created it, in the directory it made
        with ``mkdtemp``, and ``O_NOFOLLOW`` refuses a symlink planted in its place."""
        path = self.root / "credentials"
        lines = [f"{i.name} {i.url} {i.username} {i.password}\n" for i in self.qbs]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write("# qBittorrent WebUI: name url username password\n" + "".join(lines))

    def _daemon(self, role: str, args: list[str], ready: str, qb: QBInstance) -> Daemon:
        env = {f"QBSYNC_{role.upper()}_AUTH_TOKEN": self.token, **qb.qbsync_env(role)}
        d = Daemon(role, args, self.root / f"qbsync-{role}.log", env)
        self.daemons.append(d)
        deadline = time.monotonic() + 60
        while ready not in d.log_text():
            if not d.running():
                raise DemoError(f"qbsync {role} exited with {d.proc.returncode}")
            if time.monotonic() > deadline:
                raise DemoError(f"qbsync {role} did not start within 60 s")
            time.sleep(0.1)
        self.say(f"qbsync {role} started (pid {d.pid})")
        return d

    def _display(self) -> Display:
        plain = self.opts.plain
        if plain is None:
            plain = not (self.out is sys.stdout and sys.stdout.isatty())
        if plain:
            return PlainDisplay(NAME, self.out)
        return RichDisplay(NAME)

    def _watch(
        self,
        seeder: QBInstance,
        source: QBInstance,
        dest: QBInstance,
        info_hash: str,
        pieces: int,
        src_health: int,
        dest_health: int,
        started: float,
    ) -> None:
        display = self._display()
        last_verified = 0
        next_peer_nudge = time.monotonic() + PEER_NUDGE_INTERVAL
        try:
            while True:
                elapsed = time.monotonic() - started
                for d in self.daemons:
                    if not d.running():
                        raise DemoError(f"qbsync {d.role} exited with {d.proc.returncode}")
                src = source.info(info_hash)
                dst = dest.info(info_hash)
                done = verified_copy(dst)
                streamed, verified = destination_pieces(
                    fetch_status(dest_health), fetch_status(src_health), info_hash
                )
                if done:
                    streamed = verified = pieces
                last_verified = max(last_verified, verified)
                display.update(
                    Snapshot(
                        elapsed=elapsed,
                        size=self.opts.size,
                        pieces=pieces,
                        source_bytes=int(src.completed) if src is not None else 0,
                        source_rate=float(src.dlspeed) if src is not None else 0.0,
                        streamed=streamed,
                        verified=last_verified,
                        state="verified" if done else _dest_state(dst),
                    )
                )
                if done:
                    return
                if elapsed > self.opts.timeout:
                    raise DemoError(f"not synced after {self.opts.timeout:g} s")
                # The swarm is the seeder alone (no tracker, DHT or PEX on loopback): after a
                # connection attempt that failed (a busy machine, a torrent still being checked
                # when the peer was added) qBittorrent waits about a minute before it dials
                # that peer again. The seeder has no such record of the source, so it is asked
                # to dial too (tests/integration/test_harness.py measures both ways).
                no_seeder = src is not None and not src.num_seeds and float(src.progress) < 1
                if no_seeder and time.monotonic() >= next_peer_nudge:
                    next_peer_nudge = time.monotonic() + PEER_NUDGE_INTERVAL
                    source.api.torrents_add_peers(
                        peers=f"127.0.0.1:{seeder.bt_port}", torrent_hashes=info_hash
                    )
                    seeder.api.torrents_add_peers(
                        peers=f"127.0.0.1:{source.bt_port}", torrent_hashes=info_hash
                    )
                time.sleep(0.25)
        finally:
            display.close()

    def _verified_on_destination(self, dest: QBInstance, info_hash: str) -> bool:
        return verified_copy(dest.info(info_hash))

    def _keep(
        self,
        seeder: QBInstance,
        source: QBInstance,
        dest: QBInstance,
        src_health: int,
        dest_health: int,
    ) -> None:
        self.kept = True
        self.say("")
        self.say("--keep: everything stays running")
        for inst in (seeder, source, dest):
            self.say(f"  qBittorrent {inst.name:<12} WebUI {inst.url}  (pid {inst.pid})")
        self.say(f"  qbsync source       status http://127.0.0.1:{src_health}/")
        self.say(f"  qbsync destination  status http://127.0.0.1:{dest_health}/")
        self.say(f"  WebUI passwords in  {self.root / 'credentials'} (mode 0600)")
        pids = " ".join(str(p) for p in self.pids())
        self.say(f"  stop it all with:   kill {pids}")
        self.say(f"  files and logs in   {self.root}")
        for inst in self.qbs:  # our log handles; the processes keep running
            if inst._out is not None:
                inst._out.close()
                inst._out = None

    def pids(self) -> list[int]:
        out = [d.pid for d in self.daemons]
        out += [q.pid for q in self.qbs if q.pid is not None]
        return out

    def stop_all(self) -> None:
        """Stop every process this demo started, by PID: daemons first, then qBittorrents.

        After a successful run the work directory goes too: the demo created it (``mkdtemp``)
        and everything in it, and the run just proved the copy identical to the original.
        """
        for d in reversed(self.daemons):
            with contextlib.suppress(Exception):
                d.stop()
        for inst in reversed(self.qbs):
            with contextlib.suppress(Exception):
                inst.stop()
        if self.remove_workdir and self.root.name.startswith(f"{NAME}-"):
            shutil.rmtree(self.root, ignore_errors=True)

    def show_logs(self) -> None:
        for d in self.daemons:
            tail = "\n".join(d.log_text().splitlines()[-15:])
            self.say(f"--- last lines of qbsync {d.role} ({d.log_path}) ---\n{tail}")


def verified_copy(info: Any) -> bool:
    """The destination qBittorrent holds the whole torrent (added with skip-checking after
    every piece was verified on arrival, or rechecked with ``--recheck``) and qbsync tagged it
    ``synced`` (the finalizer leaves it stopped: the source seeds until hand-off)."""
    if info is None:
        return False
    tags = {t.strip() for t in str(info.get("tags") or "").split(",")}
    state = str(info.state).lower()
    return bool(info.progress == 1 and "synced" in tags and "checking" not in state)


def _dest_state(info: Any) -> str:
    """What the destination is doing: streaming until qbsync adds the torrent to its
    qBittorrent, then qBittorrent's check (if any), then the finalizer's last steps."""
    if info is None:
        return "streaming"
    return "rechecking" if "checking" in str(info.state).lower() else "finalizing"


def fetch_status(port: int) -> dict[str, Any]:
    """A daemon's ``/status`` document, or ``{}`` when it does not answer right now."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as resp:
            doc = json.loads(resp.read())
    except (OSError, urllib.error.URLError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def destination_pieces(
    dest_status: dict[str, Any], source_status: dict[str, Any], info_hash: str
) -> tuple[int, int]:
    """``(streamed, verified)`` pieces of ``info_hash`` from the two daemons' status."""
    streamed = verified = 0
    for t in _torrents(dest_status):
        if t.get("hash") == info_hash:
            streamed = int(t.get("pieces_streamed", t.get("written", 0)))
            verified = int(t.get("pieces_verified", 0))
    for t in _torrents(source_status):
        if t.get("hash") == info_hash:
            verified = max(verified, int(t.get("pieces_verified", t.get("done", 0))))
    return max(streamed, verified), verified


def _torrents(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for key in ("torrents", "tracked"):
        items = doc.get(key)
        if isinstance(items, list):
            yield from (t for t in items if isinstance(t, dict))


def compare_trees(original: Path, copy: Path) -> tuple[int, list[str]]:
    """Compare every file under ``original`` with the same path under ``copy``, byte for byte.

    Returns ``(files compared, relative paths that differ or are missing)``.
    """
    compared, different = 0, []
    for path in sorted(p for p in original.rglob("*") if p.is_file()):
        rel = path.relative_to(original)
        compared += 1
        other = copy / rel
        if not other.is_file() or not filecmp.cmp(path, other, shallow=False):
            different.append(str(rel))
    return compared, different
