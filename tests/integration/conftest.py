"""Fixtures for integration tests: real qbittorrent-nox and real qbsync processes on loopback.

Every process a fixture starts is stopped at teardown by its own PID, even when the test
fails. The output of every qbsync process is printed at teardown, so a failing test shows it
under "Captured stdout teardown".
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pytest

# The source rig's fixtures (``rig``, ``rig_factory``), for every integration test module.
from tests.integration.source_rig import rig_factory_fixture, rig_fixture  # noqa: F401
from tests.qbharness import (
    QB_BINARY,
    KiB,
    MiB,
    PeerNudger,
    QBInstance,
    QbsyncProcess,
    SeededTorrent,
    make_payload,
    make_torrent,
)
from tests.wireclient import Destination, LocalTorrent, start_destination

QbFactory = Callable[..., QBInstance]
SeededFactory = Callable[..., SeededTorrent]
QbsyncFactory = Callable[..., QbsyncProcess]

DEFAULT_FILES: dict[str, int] = {
    "a.bin": 2 * MiB + 12345,
    "b.bin": 3 * MiB - 777,
    "sub/c.bin": 1 * MiB - 7000,
}


@pytest.fixture(scope="session")
def qb_binary() -> str:
    path = shutil.which(QB_BINARY)
    if path is None:
        pytest.fail(
            f"{QB_BINARY} is not installed (Debian/Ubuntu: apt-get install qbittorrent-nox; "
            "`make test` installs it)"
        )
    return path


@pytest.fixture
def qb_factory(tmp_path: Path, qb_binary: str) -> Iterator[QbFactory]:
    """``qb_factory(name, *, refresh_ms=250, save_path=None, temp_path=None,
    incomplete_ext=False, password=None, start=True) -> QBInstance``; all stopped at teardown.

    Each instance lives in ``tmp_path/qb-<name>/`` (profile, default save path ``downloads``,
    stdout log).
    """
    instances: list[QBInstance] = []

    def factory(name: str, *, start: bool = True, **options: Any) -> QBInstance:
        """``options``: ``QBInstance``'s own keywords, passed through (one list of them, there)."""
        assert all(i.name != name for i in instances), f"duplicate instance name {name!r}"
        inst = QBInstance(name, tmp_path / f"qb-{name}", start=False, **options)
        instances.append(inst)
        if start:
            inst.start()
        return inst

    yield factory
    errors = []
    for inst in reversed(instances):
        try:
            inst.stop()
        except Exception as exc:  # keep stopping the others
            errors.append(f"{inst.name}: {exc!r}")
    assert not errors, f"failed to stop qbittorrent-nox: {errors}"


@pytest.fixture
def seeded_torrent(tmp_path: Path, qb_factory: QbFactory) -> Iterator[SeededFactory]:
    """``seeded_torrent(files=DEFAULT_FILES, *, piece_size=256 KiB, seed=0, name="payload",
    seeder=None) -> SeededTorrent``.

    Generates a deterministic multi-file payload, makes a trackerless .torrent of it, and waits
    until a seeder instance (a new one named ``seeder`` unless given) seeds it. Downloaders
    get it with ``seeded.add_to(other_instance, download_limit=...)``.
    """
    counter = 0
    nudger = PeerNudger()

    def factory(
        files: Mapping[str, int] | None = None,
        *,
        piece_size: int = 256 * KiB,
        seed: int = 0,
        name: str = "payload",
        seeder: QBInstance | None = None,
    ) -> SeededTorrent:
        nonlocal counter
        counter += 1
        if seeder is None:
            seeder = qb_factory(f"seeder{counter}" if counter > 1 else "seeder")
        files = dict(files if files is not None else DEFAULT_FILES)
        payload = make_payload(seeder.save_path / name, files, seed)
        torrent, info_hash = make_torrent(payload, piece_size)
        seeded = SeededTorrent(
            seeder=seeder,
            torrent=torrent,
            info_hash=info_hash,
            payload=payload,
            files=files,
            piece_size=piece_size,
            seed=seed,
            nudger=nudger,
        )
        seeded.add_to(seeder, connect=False)
        seeder.wait_seeding(info_hash)
        return seeded

    yield factory
    nudger.close()  # before qb_factory's teardown stops the instances it talks to


@pytest.fixture
def qbsync_factory(tmp_path: Path) -> Iterator[QbsyncFactory]:
    """``qbsync_factory(role, args, env=None, *, start=True) -> QbsyncProcess``.

    Runs ``python -m qbsync.cli <role> <args>`` with output in ``tmp_path/qbsync-<role>-N.log``;
    every process is stopped (SIGTERM, then SIGKILL) at teardown and its output printed.
    """
    procs: list[QbsyncProcess] = []

    def factory(
        role: str,
        args: list[str],
        env: Mapping[str, str] | None = None,
        *,
        start: bool = True,
    ) -> QbsyncProcess:
        log_path = tmp_path / f"qbsync-{role}-{len(procs) + 1}.log"
        proc = QbsyncProcess(role, args, env, log_path)
        procs.append(proc)
        if start:
            proc.start()
        return proc

    yield factory
    for proc in reversed(procs):
        code = proc.stop()
        print(f"===== {proc!r} exit={code} =====")
        print(proc.log_text()[-20000:])


class QbDestination(NamedTuple):
    """A ``.torrent`` made on disk, a destination qBittorrent and ``qbsync destination``
    finalizing into it: what every test of the destination's finalize path starts from."""

    qb: QBInstance
    t: LocalTorrent
    data: Path
    dest: Destination


QbDestinationFactory = Callable[..., QbDestination]


@pytest.fixture
def qb_destination(
    tmp_path: Path, qb_factory: QbFactory, qbsync_factory: QbsyncFactory
) -> QbDestinationFactory:
    """``qb_destination(files, *, seed=0, piece=64 KiB, extra=(), env=None) -> QbDestination``.

    The payload ``files`` is made under ``tmp_path/src/payload`` (deterministic from ``seed``),
    the destination qBittorrent is ``qb_factory("dst")``, and ``qbsync destination`` runs on
    ``tmp_path/data`` with ``extra`` flags and ``env`` (ready when this returns)."""

    def factory(
        files: Mapping[str, int],
        *,
        seed: int = 0,
        piece: int = 64 * KiB,
        extra: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> QbDestination:
        qb = qb_factory("dst")
        t = LocalTorrent.create(make_payload(tmp_path / "src" / "payload", files, seed), piece)
        data = tmp_path / "data"
        dest = start_destination(
            lambda role, args: qbsync_factory(role, args, env=env),
            data,
            qb_args=qb.qbsync_args(),
            extra=extra,
        )
        return QbDestination(qb, t, data, dest)

    return factory


def qb_info(qb: QBInstance, info_hash: str) -> Any:
    """qBittorrent's record of ``info_hash``, which the test expects to exist."""
    info = qb.info(info_hash)
    assert info is not None, f"{info_hash} is not in qBittorrent {qb.name}"
    return info
