"""``--notify-url`` with real daemons: the destination posts ``synced`` after a real sync,
and a webhook that never answers does not hold the sync up."""

from __future__ import annotations

import pytest

from tests.integration.source_rig import (
    RigFactory,
)
from tests.notify_receiver import Receiver

pytestmark = pytest.mark.integration


def test_destination_posts_synced_even_to_a_hung_webhook(rig_factory: RigFactory) -> None:
    hung = Receiver(None)  # records the POST, never answers
    try:
        rig = rig_factory(start_destination=False)
        dest = rig.start_destination("--notify-url", hung.url)
        rig.start_source()
        rig.add_to_source(download_limit=None)  # nothing here needs a sync mid-download
        rig.wait_synced()
        rig.assert_identical()
        [event] = hung.wait_for(1, timeout=120)
        assert event["event"] == "synced" and event["role"] == "destination"
        assert event["hash"] == rig.info_hash and event["name"] == rig.seeded.name
        assert event["size"] == rig.seeded.total_size
        assert event["path"] == str(rig.dst_data / rig.seeded.name)
        log = dest.log_text()
        assert "event=notify_enabled target=http://127.0.0.1:" in log
        assert "secret" not in log  # neither the URL's path nor its query is logged
    finally:
        hung.close()


def test_source_posts_handed_off_after_a_disk_pressure_handoff(rig_factory: RigFactory) -> None:
    receiver = Receiver(200)
    try:
        rig = rig_factory()
        # Any real disk is below a 1 PiB threshold: cleanup hands off as soon as it is synced.
        source, _ = rig.start_source(
            "--min-space", str(1 << 20), "--min-seeding-time", "0", "--notify-url", receiver.url
        )
        rig.add_to_source(download_limit=None)
        source.wait_for_log("event=handed_off", timeout=90)
        [event] = receiver.wait_for(1, timeout=120)
        assert event["event"] == "handed_off" and event["role"] == "source"
        assert event["hash"] == rig.info_hash and event["name"] == rig.seeded.name
        source.wait_for_log("event=notify_sent notify_event=handed_off", timeout=120)
    finally:
        receiver.close()
