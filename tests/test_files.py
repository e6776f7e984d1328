"""gbmpcnsl.files: file_sha256 against digests computed without it."""

from __future__ import annotations

import hashlib

import numpy as np

from gbmpcnsl.files import file_sha256


def test_file_sha256_gives_the_known_digests(tmp_path):
    empty, abc, big = tmp_path / "empty", tmp_path / "abc", tmp_path / "big"
    empty.write_bytes(b"")
    abc.write_bytes(b"abc")
    # Over the 1 MiB block file_sha256 reads at a time, and not a multiple of it.
    content = np.random.default_rng(0).integers(0, 256, 3 * (1 << 20) + 17, dtype=np.uint8).tobytes()
    big.write_bytes(content)
    # FIPS 180-2's test vectors ("" and "abc"), and hashlib on the whole content at once.
    assert file_sha256(empty) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert file_sha256(abc) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert file_sha256(str(big)) == hashlib.sha256(content).hexdigest()
