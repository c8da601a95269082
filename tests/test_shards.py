"""WebDataset shards: write/read round trip, manifest verification, corrupt shards."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random

import pytest
from PIL import Image, ImageDraw

from dalle_core.data.pairs import Pair
from dalle_core.data.shards import (
    CorruptShardError,
    Manifest,
    ManifestError,
    read_shards,
    shard_urls,
    verify_shards,
    write_shards,
)
from dalle_core.storage import LocalStorage

PREFIX = "runs/r1/shards"


def shape_png(seed: int, size: int = 32) -> bytes:
    rnd = random.Random(seed)
    img = Image.new("RGB", (size, size), tuple(rnd.randrange(256) for _ in range(3)))
    d = ImageDraw.Draw(img)
    x, y = rnd.randrange(0, size // 2), rnd.randrange(0, size // 2)
    d.ellipse([x, y, x + size // 3, y + size // 3], fill=tuple(rnd.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def make_pairs(n: int) -> list[Pair]:
    pairs = []
    for i in range(n):
        data = shape_png(i)
        caption = f"a small red circle number {i} — über café"  # non-ascii survives
        meta = {
            "url": f"http://127.0.0.1/img/{i}.png",
            "caption": caption,
            "original_width": 100 + i,
            "original_height": 80,
            "sha256": hashlib.sha256(data).hexdigest(),
            "phash": f"{i:016x}",
        }
        pairs.append(Pair(f"b000-{i:06d}", caption, data, "png", meta))
    return pairs


@pytest.fixture()
def storage(tmp_path):
    return LocalStorage(tmp_path / "store")


def test_round_trip(storage):
    pairs = make_pairs(23)
    m = write_shards(iter(pairs), storage, PREFIX, shard_size=10)
    assert [s.name for s in m.shards] == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    assert [s.count for s in m.shards] == [10, 10, 3] and m.total == 23
    assert storage.exists(f"{PREFIX}/manifest.json")
    loaded = Manifest.load(storage, PREFIX)
    assert loaded == m
    d = json.loads(storage.get_text(f"{PREFIX}/manifest.json"))
    assert set(d) >= {"shards", "total", "created", "format"}
    assert set(d["shards"][0]) == {"name", "count", "sha256", "bytes"}
    assert verify_shards(storage, PREFIX) == []

    back = list(read_shards(storage, PREFIX))
    assert len(back) == 23
    for a, b in zip(pairs, back):
        assert (a.key, a.caption, a.image_bytes, a.image_ext, a.meta) == (
            b.key, b.caption, b.image_bytes, b.image_ext, b.meta
        )


def test_readable_by_plain_webdataset(storage):
    import webdataset as wds

    pairs = make_pairs(7)
    write_shards(pairs, storage, PREFIX, shard_size=4)
    urls = shard_urls(storage, PREFIX)
    assert len(urls) == 2 and all(u.endswith(".tar") for u in urls)
    ds = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("__key__", "png", "txt", "json")
    rows = list(ds)
    assert [r[0] for r in rows] == [p.key for p in pairs]
    for (key, img, txt, meta), p in zip(rows, pairs):
        assert img.size == (32, 32)
        assert txt == p.caption and meta == p.meta


def test_deterministic_and_stale_shards_removed(storage):
    m1 = write_shards(make_pairs(12), storage, PREFIX, shard_size=4)
    m2 = write_shards(make_pairs(12), storage, PREFIX, shard_size=4)
    assert [s.sha256 for s in m1.shards] == [s.sha256 for s in m2.shards]
    write_shards(make_pairs(5), storage, PREFIX, shard_size=4)
    names = [k.rsplit("/", 1)[1] for k in storage.list(PREFIX)]
    assert names == ["manifest.json", "shard-00000.tar", "shard-00001.tar"]
    assert verify_shards(storage, PREFIX) == []


def test_content_digest_names_the_data_not_when_it_was_written(storage):
    """What training runs key their checkpoints on: the same pairs sharded again (a new manifest,
    another write time) give the same digest; one more pair or other pairs give another."""
    from dataclasses import replace

    m1 = write_shards(make_pairs(12), storage, PREFIX, shard_size=4)
    m2 = replace(write_shards(make_pairs(12), storage, PREFIX, shard_size=4), created="2031-01-01T00:00:00+00:00")
    assert m1.created != m2.created and m1.content_digest() == m2.content_digest()
    assert write_shards(make_pairs(13), storage, PREFIX, shard_size=4).content_digest() != m1.content_digest()
    assert replace(m1, extra={"dvae_sha256": "other"}).content_digest() != m1.content_digest()


def test_empty_input_and_duplicate_keys(storage):
    m = write_shards([], storage, PREFIX, shard_size=4)
    assert m.total == 0 and m.shards == []
    assert list(read_shards(storage, PREFIX)) == []
    p = make_pairs(2)
    p[1].key = p[0].key
    with pytest.raises(ValueError, match="duplicate sample key 'b000-000000'"):
        write_shards(p, storage, PREFIX, shard_size=4)


def _flip_byte(storage, key, offset):
    path = storage.path(key)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _png_offset(storage, key):
    """An offset inside the first sample's image data (not a tar header)."""
    data = storage.path(key).read_bytes()
    return data.index(b"IDAT") + 8


def test_verify_catches_flipped_byte_truncation_missing_extra(storage):
    write_shards(make_pairs(12), storage, PREFIX, shard_size=4)
    _flip_byte(storage, f"{PREFIX}/shard-00000.tar", _png_offset(storage, f"{PREFIX}/shard-00000.tar"))
    p1 = storage.path(f"{PREFIX}/shard-00001.tar")
    # cut inside the last sample's image (half the file may be only the tar's zero padding)
    data = p1.read_bytes()
    p1.write_bytes(data[: data.rindex(b"IDAT") + 8])
    storage.put_bytes(f"{PREFIX}/shard-00009.tar", b"stray")
    problems = verify_shards(storage, PREFIX)
    by = {(p.shard, p.kind) for p in problems}
    assert ("shard-00000.tar", "checksum") in by
    assert ("shard-00000.tar", "count") not in by  # bytes flipped, samples all there
    assert ("shard-00001.tar", "checksum") in by and ("shard-00001.tar", "size") in by
    assert ("shard-00001.tar", "unreadable") in by or ("shard-00001.tar", "count") in by
    assert ("shard-00009.tar", "extra") in by
    assert not any(p.shard == "shard-00002.tar" for p in problems)

    storage.delete(f"{PREFIX}/shard-00002.tar")
    assert ("shard-00002.tar", "missing") in {(p.shard, p.kind) for p in verify_shards(storage, PREFIX)}
    storage.delete(f"{PREFIX}/manifest.json")
    assert [p.kind for p in verify_shards(storage, PREFIX)] == ["manifest"]
    with pytest.raises(ManifestError, match="no shard manifest"):
        list(read_shards(storage, PREFIX))


def test_read_raises_naming_the_corrupt_shard(storage):
    write_shards(make_pairs(12), storage, PREFIX, shard_size=4)
    key = f"{PREFIX}/shard-00001.tar"
    _flip_byte(storage, key, _png_offset(storage, key))
    it = read_shards(storage, PREFIX)
    got = [next(it) for _ in range(4)]  # shard 0 is fine
    assert got[-1].key == "b000-000003"
    with pytest.raises(CorruptShardError, match=r"shard-00001\.tar.*sha256") as ei:
        next(it)
    assert ei.value.shard == "shard-00001.tar"


def test_read_truncated_shard_without_verify_is_not_silent(storage):
    write_shards(make_pairs(12), storage, PREFIX, shard_size=4)
    p = storage.path(f"{PREFIX}/shard-00002.tar")
    p.write_bytes(p.read_bytes()[:1500])
    with pytest.raises(CorruptShardError, match=r"shard-00002\.tar"):
        list(read_shards(storage, PREFIX, verify=False))


def test_skip_corrupt_reports_and_skips(storage, caplog):
    write_shards(make_pairs(12), storage, PREFIX, shard_size=4)
    _flip_byte(storage, f"{PREFIX}/shard-00000.tar", _png_offset(storage, f"{PREFIX}/shard-00000.tar"))
    p = storage.path(f"{PREFIX}/shard-00002.tar")
    p.write_bytes(p.read_bytes()[:1500])
    errors: list[CorruptShardError] = []
    got = list(read_shards(storage, PREFIX, skip_corrupt=True, on_error=errors.append))
    assert [x.key for x in got] == [f"b000-{i:06d}" for i in range(4, 8)]  # whole shard 1 only
    assert [e.shard for e in errors] == ["shard-00000.tar", "shard-00002.tar"]
    # without a callback it goes to the log
    with caplog.at_level(logging.WARNING, logger="dalle_core.data.shards"):
        got = list(read_shards(storage, PREFIX, skip_corrupt=True))
    assert len(got) == 4
    assert "shard-00000.tar" in caplog.text and "shard-00002.tar" in caplog.text
    # a missing shard is reported the same way
    storage.delete(f"{PREFIX}/shard-00001.tar")
    errors.clear()
    assert list(read_shards(storage, PREFIX, skip_corrupt=True, on_error=errors.append)) == []
    assert "missing" in str(errors[1]) and errors[1].shard == "shard-00001.tar"
