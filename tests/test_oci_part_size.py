"""OCI's multipart uploads take at most 10,000 parts: a file that would need more at the configured part size goes up
in larger parts, and is verified split the same way (issue 16).

The store's limit is :data:`cairn.storage.oci.MAX_PARTS`; these tests lower it to a handful of parts, so that a
12 MiB file against the OCI stand-in stands for a 1.25 TiB one at the default 128 MiB.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import cairn.storage.oci as oci_module
from cairn.errors import ObjectStoreError
from cairn.storage.oci import OCIObjectStore
from store_servers.oci import OCIStandIn

MiB = 1 << 20


def _random_file(tmp_path: Path, name: str, size: int) -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path


def _parts_sent(server: OCIStandIn, since: int) -> list[str]:
    """The part uploads the stand-in saw since request number ``since``."""
    return [line for line in server.requests[since:] if line.startswith("PUT") and "uploadPartNum=" in line]


def test_a_file_above_the_part_limit_goes_up_in_larger_parts_and_verifies(
    oci_store: OCIObjectStore, oci_server: OCIStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(oci_module, "MAX_PARTS", 2, raising=False)  # 12 MiB at 5 MiB parts needs 3
    assert oci_store.part_size == 5 * MiB
    source = _random_file(tmp_path, "big.bin", 12 * MiB)
    before = len(oci_server.requests)
    oci_store.upload_object("big.bin", str(source))
    assert len(_parts_sent(oci_server, before)) == 2, "the part size doubles (10 MiB) so that the file fits"
    multipart = oci_server.buckets[oci_store.bucket].objects["conformance/big.bin"].multipart_md5
    assert multipart is not None and multipart.endswith("-2")
    oci_store.verify_upload("big.bin", str(source))  # split as it was uploaded, not at the configured 5 MiB
    other = _random_file(tmp_path, "other.bin", 12 * MiB)
    with pytest.raises(ObjectStoreError, match="checksum"):
        oci_store.verify_upload("big.bin", str(other))


def test_a_file_within_the_limit_keeps_the_configured_part_size(
    oci_store: OCIObjectStore, oci_server: OCIStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(oci_module, "MAX_PARTS", 3, raising=False)
    source = _random_file(tmp_path, "big.bin", 12 * MiB)
    before = len(oci_server.requests)
    oci_store.upload_object("big.bin", str(source))
    assert len(_parts_sent(oci_server, before)) == 3
    oci_store.verify_upload("big.bin", str(source))


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (0, 128 * MiB),
        (10_000 * 128 * MiB, 128 * MiB),  # exactly 1.25 TiB: 10,000 parts
        (10_000 * 128 * MiB + 1, 256 * MiB),  # one byte more: the part size doubles
        (5 * 10_000 * 128 * MiB, 1024 * MiB),  # 6.25 TiB: 5x the parts, so doubled three times
    ],
)
def test_the_part_size_doubles_until_the_file_fits_in_ten_thousand_parts(size: int, expected: int) -> None:
    from cairn.storage.oci import MAX_PARTS, part_size_for

    assert MAX_PARTS == 10_000
    assert part_size_for(size, 128 * MiB) == expected
