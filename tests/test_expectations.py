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


# ----------------------------------------------------------------- crawl-batch figures (bad data)

def _batch(n_rows=100, n_failed=10, input_count=90, kept=80, removed=None):
    from dalle_core.data.expectations import batch_statistics

    size = DATA.image_size
    frame = pairs_frame([{"key": f"k{i}", "caption": "a small red circle above a blue square", "original_width": 120,
                          "original_height": 100, "width": size, "height": size} for i in range(kept)])
    return frame, batch_statistics({"n_rows": n_rows, "n_failed": n_failed},
                                   {"input_count": input_count, "kept_count": kept, "removed": removed or {}}, frame)


def test_batch_figures_are_rates_of_what_the_crawl_and_filters_saw():
    _, stats = _batch(n_rows=200, n_failed=50, input_count=150, kept=90, removed={"non_english": 30, "boilerplate_date": 30})
    assert stats["crawl_failure_rate"] == 0.25 and stats["kept_fraction"] == 0.6
    assert stats["drop_rate.non_english"] == 0.2 and stats["non_english_share"] == 0.2
    assert stats["drop_rate.boilerplate_date"] == 0.2 and stats["drop_rate.aspect_ratio"] == 0.0
    assert stats["mean_caption_words"] == 8.0


def test_a_healthy_batch_passes_its_bounds():
    from dalle_core.data.expectations import validate_crawl_batch

    frame, stats = _batch(removed={"non_english": 5, "exact_duplicate": 5})
    result = validate_crawl_batch(frame, stats, {"mean_caption_words": 8.5, "non_english_share": 0.1, "batches": 2}, DATA)
    assert result.success, result.failure_lines()


@pytest.mark.parametrize("batch, reference, figure, bound", [
    (dict(n_failed=80), None, "crawl_failure_rate 0.8", "max_crawl_failure_rate"),  # an expired list: dead links
    (dict(kept=20, removed={"boilerplate_date": 70}), None, "drop_rate.boilerplate_date 0.778", "max_filter_drop_rate"),
    (dict(kept=20, removed={"boilerplate_date": 70}), None, "kept_fraction 0.222", "min_kept_fraction"),
    # caption length drifted: 8 words against 4 before (a different source, a scraper change)
    (dict(), {"mean_caption_words": 4.0, "non_english_share": 0.0, "batches": 3}, "mean_caption_words 8",
     "max_caption_words_drift vs 3 earlier batches"),
    # the language mix drifted: 25% non-English against 1% before
    (dict(removed={"non_english": 23}, kept=60), {"mean_caption_words": 8.0, "non_english_share": 0.01, "batches": 1},
     "non_english_share 0.256", "max_non_english_drift vs 1 earlier batches"),
])
def test_bad_data_fails_naming_the_figure_its_value_and_the_profile_bound(batch, reference, figure, bound):
    from dalle_core.data.expectations import validate_crawl_batch

    frame, stats = _batch(**batch)
    result = validate_crawl_batch(frame, stats, reference, DATA)
    text = "\n".join(result.failure_lines())
    assert not result.success and figure in text and f"({bound})" in text, text


def test_bounds_are_profile_fields():
    from dataclasses import replace

    from dalle_core.data.expectations import validate_crawl_batch

    frame, stats = _batch(kept=20, removed={"non_english": 70})
    assert not validate_crawl_batch(frame, stats, None, DATA).success
    lenient = replace(DATA, filter_drop_rate_bounds=(("non_english", 0.9),), min_kept_fraction=0.2)
    result = validate_crawl_batch(frame, stats, None, lenient)
    assert result.success, result.failure_lines()


def test_drift_reference_is_the_mean_of_earlier_passing_batches():
    from dalle_core.data.expectations import drift_reference

    assert drift_reference([]) is None
    ref = drift_reference([{"mean_caption_words": 6.0, "non_english_share": 0.1},
                           {"mean_caption_words": 8.0, "non_english_share": 0.3}, {}])
    assert ref == pytest.approx({"mean_caption_words": 7.0, "non_english_share": 0.2, "batches": 2})


# ----------------------------------------------------------------- verdicts in storage (the gate)

def test_the_gate_fails_closed_and_is_bound_to_the_data(tmp_path):
    from dalle_core.data import quality_gate as qg

    store = LocalStorage(tmp_path)
    store.put_text("b/report.json", "{}")
    digest = qg.data_digest(store, ["b/report.json"])
    status = qg.gate(store, "b", digest, "crawl batch b", "re-run filter_job")
    assert not status.passed and "no data-quality verdict" in status.reason  # never checked: held back
    failed = QualityResult(False, [{"expectation": "expect_column_values_to_be_in_set", "column": "lang",
                                    "unexpected_count": 3, "element_count": 10, "examples": ["k1"]}], {}, "filtered_pairs")
    qg.write_verdict(store, "b", failed, digest)
    status = qg.gate(store, "b", digest, "crawl batch b", "re-run filter_job")
    assert not status.passed and "crawl batch b failed" in status.reason and "3 of 10 rows" in status.reason
    with pytest.raises(qg.QualityGateError, match="lang"):
        qg.require(status)
    qg.write_verdict(store, "b", QualityResult(True, [], {}, "filtered_pairs"), digest)
    assert qg.gate(store, "b", digest, "crawl batch b", "").passed
    store.put_text("b/report.json", '{"changed": 1}')  # new data under an old verdict
    status = qg.gate(store, "b", qg.data_digest(store, ["b/report.json"]), "crawl batch b", "re-run filter_job")
    assert not status.passed and "changed since" in status.reason
    qg.clear_verdict(store, "b")
    assert qg.read_verdict(store, "b") is None
