"""The broker harness's own pieces that need no broker."""

import base64

from tests.support.apache_kafka import kraft_cluster_id


def test_kraft_cluster_ids_never_start_with_a_dash_and_decode_to_16_bytes():
    # one base64 id in 64 starts with "-", which kafka-storage's argument parser takes for an option; 4,000
    # draws would meet about 60 of them
    ids = [kraft_cluster_id() for _ in range(4000)]
    assert not [i for i in ids if i.startswith("-")]
    assert all(len(base64.urlsafe_b64decode(i + "==")) == 16 for i in ids)
    assert len(set(ids)) == len(ids)
