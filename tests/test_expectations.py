"""Great Expectations suites: a good batch passes, a deliberately bad one fails by name."""

from __future__ import annotations

import hashlib
import io
import json
import random

import pytest
from PIL import Image, ImageDraw

from dalle_core.data.expectations import (
    PAIR_COLUMNS,
    QualityResult,
    pairs_frame,
    validate_filtered_pairs,
    validate_shards,
)
from dalle_core.data.filters import build_filters, compute_phash
from dalle_core.data.pairs import Pair
from dalle_core.data.shards import Manifest, verify_shards, write_shards
from dalle_core.profiles import get_profile
from dalle_core.storage import LocalStorage

DATA = get_profile("tiny").data
CAPTIONS = [
    "a small red circle to the left of a blue square",
    "a large green triangle above a yellow star",
    "three orange hexagons on a grey background",
    "a photo of a cat sitting on a sofa",
    "a blue square to the right of a purple circle",
    "a man riding a horse on the beach at sunset",
]


def shape_image(seed: int, size: int) -> Image.Image:
    rnd = random.Random(seed)
    img = Image.new("RGB", (size, size), tuple(rnd.randrange(256) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = rnd.randrange(0, size - 20), rnd.randrange(0, size - 20)
        w, h = rnd.randrange(10, 30), rnd.randrange(10, 30)
        d.rectangle([x0, y0, x0 + w, y0 + h], fill=tuple(rnd.randrange(256) for _ in range(3)))
    return img


def make_pair(i: int, caption: str, original=(120, 100), size: int | None = None, img=None) -> Pair:
    img = img if img is not None else shape_image(i, size or DATA.image_size)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    data = buf.getvalue()
    meta = {
        "url": f"http://127.0.0.1/{i}.png",
        "caption": caption,
        "original_width": original[0],
        "original_height": original[1],
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    return Pair(f"b000-{i:06d}", caption, data, "png", meta)


@pytest.fixture(scope="module")
def eval_phashes():
    return {f"coco-{i}": compute_phash(shape_image(900 + i, DATA.image_size)) for i in range(4)}


@pytest.fixture(scope="module")
def good_pairs(eval_phashes):
    pairs = [make_pair(i, c) for i, c in enumerate(CAPTIONS)]
    kept = list(build_filters(DATA, eval_phashes).apply(pairs))
    assert len(kept) == len(pairs)
    return kept


def test_pairs_frame_columns(good_pairs, eval_phashes):
    df = pairs_frame(good_pairs, eval_phashes)
    assert list(df.columns)[: len(PAIR_COLUMNS)] == PAIR_COLUMNS
    row = df.iloc[0]
    assert row["key"] == "b000-000000" and row["lang"] == "en" and row["lang_prob"] > 0.5
    assert (row["width"], row["height"]) == (DATA.image_size, DATA.image_size)
    assert row["caption_words"] == 11 and row["caption_chars"] == len(CAPTIONS[0])
    assert row["aspect_ratio"] == pytest.approx(1.2)
    assert row["phash"] == good_pairs[0].meta["phash"]
    assert (df["eval_overlap_distance"] > DATA.near_duplicate_max_distance).all()
    # samples (from shards) and plain records give the same frame
    df2 = pairs_frame([p.to_sample() for p in good_pairs], eval_phashes)
    assert df2[PAIR_COLUMNS].equals(df[PAIR_COLUMNS])
    df3 = pairs_frame(df.drop(columns=["lang", "lang_prob"]).to_dict("records"), eval_phashes)
    assert list(df3["lang"]) == list(df["lang"])


def test_good_batch_passes(good_pairs, eval_phashes):
    result = validate_filtered_pairs(pairs_frame(good_pairs, eval_phashes), DATA)
    assert isinstance(result, QualityResult)
    assert result.success, result.to_markdown()
    assert result.failures == []
    assert result.statistics["evaluated_expectations"] >= 10
    assert "passed" in result.to_markdown()
    json.dumps(result.to_dict())
    # no evaluation set: the overlap distance is missing and passes
    assert validate_filtered_pairs(pairs_frame(good_pairs), DATA).success


def test_bad_batch_fails_naming_expectation_and_count(good_pairs, eval_phashes):
    eval_img = shape_image(901, DATA.image_size)
    bad = [
        make_pair(100, "un cercle rouge au-dessus d'un carré bleu"),  # French
        make_pair(101, "a wide red rectangle next to a blue square", original=(300, 100)),  # 3:1
        make_pair(102, "a small red circle to the left of a square", size=DATA.image_size * 2),
        make_pair(103, "a red circle on a white background", original=(10, 10)),  # too small
        make_pair(104, "a planted copy of an evaluation image here", img=eval_img),
    ]
    dup = make_pair(0, CAPTIONS[0])  # same key as good_pairs[0]
    df = pairs_frame(good_pairs + bad + [dup], eval_phashes)
    result = validate_filtered_pairs(df, DATA)
    assert not result.success
    fails = {(f["expectation"], f["column"]): f for f in result.failures}

    lang = fails[("expect_column_values_to_be_in_set", "lang")]
    assert lang["unexpected_count"] == 1
    assert lang["examples"][0]["key"] == "b000-000100"
    ratio = fails[("expect_column_values_to_be_between", "aspect_ratio")]
    assert ratio["unexpected_count"] == 1 and ratio["examples"][0]["key"] == "b000-000101"
    assert fails[("expect_column_values_to_be_between", "width")]["unexpected_count"] == 1
    assert fails[("expect_column_values_to_be_between", "original_width")]["unexpected_count"] == 1
    assert fails[("expect_column_values_to_be_unique", "key")]["unexpected_count"] == 2
    overlap = fails[("expect_column_values_to_be_between", "eval_overlap_distance")]
    assert overlap["unexpected_count"] == 1 and overlap["examples"][0]["key"] == "b000-000104"

    md = result.to_markdown()
    assert "FAILED" in md
    assert "expect_column_values_to_be_in_set on column `lang` failed: 1 of" in md
    assert "expect_column_values_to_be_between on column `aspect_ratio` failed: 1 of" in md
    json.dumps(result.to_dict())


def test_null_empty_and_short_captions_fail():
    df = pairs_frame(
        [
            {"key": "k0", "caption": "red circle", "lang": "en", "lang_prob": 0.9,
             "original_width": 64, "original_height": 64, "width": 32, "height": 32,
             "phash": "0" * 16},
            {"key": "k1", "caption": None, "original_width": 64, "original_height": 64,
             "width": 32, "height": 32, "phash": "0" * 16},
            {"key": "k2", "caption": "", "original_width": 64, "original_height": 64,
             "width": 32, "height": 32, "phash": "0" * 16},
        ]
    )
    result = validate_filtered_pairs(df, DATA)
    fails = {(f["expectation"], f["column"]): f["unexpected_count"] for f in result.failures}
    assert fails[("expect_column_values_to_not_be_null", "caption")] == 1
    assert fails[("expect_column_value_lengths_to_be_between", "caption")] == 1
    assert fails[("expect_column_values_to_be_between", "caption_words")] == 2  # "red circle", ""
    assert ("expect_column_values_to_be_in_set", "lang") in fails  # the two without a caption


def test_shard_suite(tmp_path, good_pairs):
    storage = LocalStorage(tmp_path)
    manifest = write_shards(good_pairs, storage, "shards", shard_size=4)
    ok = validate_shards(manifest, verify_shards(storage, "shards"), n_expected=len(good_pairs))
    assert ok.success, ok.to_markdown()

    # wrong expected total
    wrong = validate_shards(manifest, [], n_expected=len(good_pairs) + 1)
    names = [f["expectation"] for f in wrong.failures]
    assert "expect_column_sum_to_be_between" in names
    assert "manifest_total_equals_filtered_count" in names

    # a flipped byte and a stray shard
    path = storage.path("shards/shard-00001.tar")
    data = bytearray(path.read_bytes())
    data[data.index(b"IDAT") + 8] ^= 0xFF
    path.write_bytes(bytes(data))
    storage.put_bytes("shards/shard-00007.tar", b"stray")
    bad = validate_shards(
        Manifest.load(storage, "shards"), verify_shards(storage, "shards"), len(good_pairs)
    )
    assert not bad.success
    fails = {(f["expectation"], f["column"]): f for f in bad.failures}
    ck = fails[("expect_column_values_to_be_in_set", "checksum_ok")]
    assert ck["unexpected_count"] == 2  # the flipped shard and the stray one
    assert {e["name"] for e in ck["examples"]} == {"shard-00001.tar", "shard-00007.tar"}
    assert fails[("expect_column_values_to_be_in_set", "in_manifest")]["unexpected_count"] == 1
    assert "checksum_ok" in bad.to_markdown()
