"""The storage resource against a local directory and a real S3-protocol server."""

import pytest

from dalle_core.storage import LocalStorage, S3Storage, StorageError, open_storage


def _exercise(store):
    store.put_bytes("a/b/one.bin", b"\x00\x01")
    store.put_text("a/two.txt", "héllo")
    assert store.exists("a/b/one.bin") and not store.exists("a/missing")
    assert store.get_bytes("a/b/one.bin") == b"\x00\x01"
    assert store.get_text("a/two.txt") == "héllo"
    assert store.list("a/") == ["a/b/one.bin", "a/two.txt"]
    assert store.list("zzz/") == []
    with store.local_copy("a/two.txt") as p:
        assert p.read_text(encoding="utf-8") == "héllo"
    with pytest.raises(FileNotFoundError, match="a/missing"):
        store.get_bytes("a/missing")
    store.delete("a/two.txt")
    assert store.list("a/") == ["a/b/one.bin"]


def test_local_storage_round_trip(tmp_path):
    store = LocalStorage(tmp_path / "root")
    _exercise(store)
    assert store.uri("a/b/one.bin") == str(tmp_path / "root" / "a" / "b" / "one.bin")


def test_local_storage_refuses_keys_outside_root(tmp_path):
    with pytest.raises(StorageError, match="escapes"):
        LocalStorage(tmp_path).put_bytes("../evil", b"x")


def test_s3_storage_round_trip_on_real_server(s3_endpoint, s3_bucket, tmp_path):
    store = open_storage(f"s3://{s3_bucket}/runs/x", endpoint_url=s3_endpoint)
    assert isinstance(store, S3Storage)
    _exercise(store)
    assert store.uri("a/b/one.bin") == f"s3://{s3_bucket}/runs/x/a/b/one.bin"
    src = tmp_path / "big.bin"
    src.write_bytes(b"z" * 300_000)
    store.put_file("files/big.bin", src)
    assert store.get_file("files/big.bin", tmp_path / "back.bin").read_bytes() == src.read_bytes()


def test_s3_bucket_name_too_short_names_the_setting():
    with pytest.raises(StorageError, match="too short"):
        S3Storage("ab")
