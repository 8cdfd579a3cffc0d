"""TLS between the real daemons (--tls-cert/--tls-key, --tls-ca) and --auth-token-file."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.source_rig import (
    RigFactory,
    metric,
    tags_of,
)
from tests.qbharness import make_self_signed, wait_until

pytestmark = pytest.mark.integration


def test_tls_with_token_file_and_a_wrong_ca_first(tmp_path: Path, rig_factory: RigFactory) -> None:
    cert, key = make_self_signed(tmp_path / "tls", "destination")
    other_ca, _ = make_self_signed(tmp_path / "tls-other", "other")
    rig = rig_factory(start_destination=False)
    rig.start_destination("--tls-cert", str(cert), "--tls-key", str(key))
    token_file = tmp_path / "token"
    token_file.write_text(rig.token + "\n")
    token_file.chmod(0o600)
    rig.add_to_source(download_limit=None)  # TLS and the token, not streaming, are tested here

    # A CA that did not sign the destination's certificate: nothing connects, and it says why.
    wrong, wrong_health = rig.start_source(
        "--tls-ca", str(other_ca), "--auth-token-file", str(token_file), token=""
    )
    wait_until(lambda: "code=auth-failed" in wrong.log_text(), 120, 0.2, "TLS refusal logged")
    assert metric(wrong_health, "qbsync_pieces_sent_total") == 0
    assert wrong.stop() == 0

    source, health = rig.start_source(
        "--tls-ca", str(cert), "--auth-token-file", str(token_file), token=""
    )
    wait_until(lambda: "synced" in tags_of(rig.src_qb, rig.info_hash), 90, 0.2, "synced")
    rig.assert_identical()
    assert metric(health, "qbsync_pieces_resent_total") == 0
    assert rig.token not in source.log_text()  # the secret never reaches a log line
