"""The image-code manifest is assembled only when every shard is coded by the same models."""

import numpy as np
import pytest

from dalle_core.data import codes
from dalle_core.data.shards import Manifest, ShardInfo
from dalle_core.storage import LocalStorage

MODELS = {"dvae_sha256": "a" * 64, "tokenizer_sha256": "b" * 64}
EXTRA = {"grid": 2, "image_vocab": 8, "text_len": 4, "text_vocab": 20}


def _coded(storage, name: str, source_sha: str, models=MODELS) -> None:
    pair = codes.CodedPair("k0", "a red circle", np.zeros(4, np.int32), np.zeros((2, 2), np.int16), {})
    info = codes.write_code_shard([pair], storage, f"image_codes/{name}")
    codes.mark_done(storage, "image_codes", info, source_sha, models, EXTRA)


def test_assembles_when_every_shard_is_coded_and_names_the_missing_and_stale(tmp_path):
    storage = LocalStorage(tmp_path)
    source = Manifest(shards=[ShardInfo(f"shard-{i:05d}.tar", 1, str(i) * 64, 10) for i in range(4)], total=4)
    _coded(storage, "shard-00000.tar", "0" * 64)
    _coded(storage, "shard-00002.tar", "x" * 64)  # from an older version of the shard
    _coded(storage, "shard-00003.tar", "3" * 64, {**MODELS, "dvae_sha256": "c" * 64})
    with pytest.raises(codes.CodeManifestError) as err:
        codes.assemble_code_manifest(storage, "image_codes", source, MODELS)
    message = str(err.value)
    assert "3 of 4 shards" in message and "shard-00000.tar" not in message
    assert "shard-00001.tar: not encoded" in message
    assert "shard-00002.tar: encoded from another version of the shard" in message
    assert "shard-00003.tar: encoded with another dvae (cccccccccccc, not aaaaaaaaaaaa)" in message
    assert not storage.exists("image_codes/manifest.json")
    for i in (1, 2, 3):
        _coded(storage, f"shard-{i:05d}.tar", str(i) * 64)
    manifest = codes.assemble_code_manifest(storage, "image_codes", source, MODELS)
    assert [s.name for s in manifest.shards] == [s.name for s in source.shards] and manifest.total == 4
    assert manifest.extra == {**EXTRA, **MODELS}
    assert Manifest.load(storage, "image_codes").total == 4
