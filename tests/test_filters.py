"""The paper's data filters (appendix C), the pipeline and its report, dedup state."""

from __future__ import annotations

import hashlib
import io
import json
import random

import pytest
from PIL import Image, ImageDraw

from dalle_core.data.filters import (
    AspectRatioOutOfRange,
    BoilerplateDateCaption,
    CaptionTooShort,
    EvalSetOverlap,
    ExactDuplicate,
    FILTER_ORDER,
    FilterPipeline,
    HammingIndex,
    ImageTooSmall,
    NearDuplicate,
    NonEnglishCaption,
    build_filters,
    compute_phash,
    hamming,
)
from dalle_core.data.pairs import InvalidSampleError, Pair
from dalle_core.profiles import get_profile

DATA = get_profile("tiny").data


def shape_image(seed: int, size: int = 64) -> Image.Image:
    """A background with three coloured shapes; different seeds give different images."""
    rnd = random.Random(seed)
    img = Image.new("RGB", (size, size), tuple(rnd.randrange(256) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = rnd.randrange(0, size - 20), rnd.randrange(0, size - 20)
        w, h = rnd.randrange(10, 30), rnd.randrange(10, 30)
        col = tuple(rnd.randrange(256) for _ in range(3))
        if rnd.random() < 0.5:
            d.ellipse([x0, y0, x0 + w, y0 + h], fill=col)
        else:
            d.rectangle([x0, y0, x0 + w, y0 + h], fill=col)
    return img


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def make_pair(
    key: str,
    caption: str = "a small red circle to the left of a blue square",
    seed: int = 0,
    original: tuple[int, int] = (128, 128),
    image_bytes: bytes | None = None,
    sha: str | None = None,
) -> Pair:
    data = image_bytes if image_bytes is not None else encode(shape_image(seed, DATA.image_size))
    meta = {
        "url": f"http://127.0.0.1/{key}.png",
        "caption": caption,
        "original_width": original[0],
        "original_height": original[1],
        "sha256": sha or hashlib.sha256(data + key.encode()).hexdigest(),
    }
    return Pair(key=key, caption=caption, image_bytes=data, image_ext="png", meta=meta)


# ---------------------------------------------------------------- Pair


def test_pair_sample_round_trip_and_errors():
    p = make_pair("b000-000001")
    s = p.to_sample()
    assert set(s) == {"__key__", "png", "txt", "json"}
    q = Pair.from_sample(s)
    assert (q.key, q.caption, q.image_bytes, q.image_ext, q.meta) == (
        p.key, p.caption, p.image_bytes, "png", p.meta
    )
    assert q.image.mode == "RGB" and q.image.size == (DATA.image_size,) * 2
    assert q.image is q.image  # cached
    # already-decoded values (webdataset with a decoder) work too
    q2 = Pair.from_sample({"__key__": "k1", "jpg": b"x", "txt": "hi", "json": {"a": 1}})
    assert q2.caption == "hi" and q2.meta == {"a": 1} and q2.image_ext == "jpg"
    with pytest.raises(InvalidSampleError, match=r"b000-000001.*missing txt"):
        Pair.from_sample({k: v for k, v in s.items() if k != "txt"})
    with pytest.raises(InvalidSampleError, match=r"b000-000001.*missing image"):
        Pair.from_sample({k: v for k, v in s.items() if k != "png"})
    with pytest.raises(InvalidSampleError, match=r"b000-000001.*missing json"):
        Pair.from_sample({k: v for k, v in s.items() if k != "json"})
    with pytest.raises(InvalidSampleError, match="no"):
        Pair(key="a.b", caption="x", image_bytes=b"", image_ext="png", meta={})


# ---------------------------------------------------------------- caption filters


def test_caption_too_short():
    f = CaptionTooShort(min_words=3, max_chars=40)
    assert f.check(make_pair("k1", "a red circle")) is None
    assert "2 word" in f.check(make_pair("k2", "red circle"))
    assert f.check(make_pair("k3", "   ")) is not None
    assert "characters" in f.check(make_pair("k4", "a " + "very " * 20 + "long caption"))


ENGLISH = [
    "a red circle above a blue square",
    "a small red circle to the left of a blue square",
    "a photo of a cat sitting on a sofa",
    "A man riding a horse on the beach at sunset",
    "three orange hexagons on a grey background",
]
FOREIGN = {
    "fr": ["un cercle rouge au-dessus d'un carré bleu", "une petite maison dans la prairie",
           "un chat noir dort sur le canapé"],
    "de": ["ein roter Kreis über einem blauen Quadrat", "der Hund spielt im Garten",
           "ein kleines Haus am See"],
    "es": ["un círculo rojo encima de un cuadrado azul", "una casa pequeña junto al lago",
           "el perro juega en el jardín"],
}


def test_non_english_keeps_english():
    f = NonEnglishCaption(DATA.english_min_confidence)
    for c in ENGLISH:
        assert f.check(make_pair("k", c)) is None, c


@pytest.mark.parametrize("lang", sorted(FOREIGN))
def test_non_english_drops_french_german_spanish(lang):
    f = NonEnglishCaption(DATA.english_min_confidence)
    for c in FOREIGN[lang]:
        reason = f.check(make_pair("k", c))
        assert reason is not None and "language" in reason, c
        assert reason.startswith(f"language {lang}"), (c, reason)


def test_non_english_low_confidence_english_dropped():
    # English at top but under a (strict) threshold is dropped, with the probability in the reason
    f = NonEnglishCaption(min_confidence=0.999)
    reason = f.check(make_pair("k", "a red circle above a blue square"))
    assert reason is not None and "p=" in reason


BOILERPLATE = [
    "photo taken on 12 March 2009",
    "IMG_20090312_1422.jpg",
    "2009-03-12 14:22:01",
    "DSC01234",
    "uploaded on 3/12/2009",
    "Photo taken on March 12th, 2009 at 2:22 pm",
    "P1010001.JPG",
    "Taken on Tuesday, 12 March 2009",
]
REAL_WITH_DATES = [
    "a red circle drawn in 2009 above a blue square",
    "a small red circle to the left of a blue square",
    "the 2012 olympic opening ceremony in london",
    "a march of protesters on main street, 12 March 2009",
    "a dog playing with 3 red balls on the grass",
]


def test_boilerplate_date_caption():
    f = BoilerplateDateCaption()
    for c in BOILERPLATE:
        assert f.check(make_pair("k", c)) is not None, c
    for c in REAL_WITH_DATES:
        assert f.check(make_pair("k", c)) is None, c


# ---------------------------------------------------------------- image-size filters


def test_aspect_ratio_and_small():
    a = AspectRatioOutOfRange(*DATA.aspect_ratio_range)
    for size in [(100, 100), (200, 100), (100, 200), (150, 100)]:
        assert a.check(make_pair("k", original=size)) is None, size
    for size in [(300, 100), (100, 201), (201, 100)]:
        assert "aspect ratio" in a.check(make_pair("k", original=size)), size
    s = ImageTooSmall(DATA.min_image_side)
    assert s.check(make_pair("k", original=(DATA.min_image_side, 100))) is None
    assert s.check(make_pair("k", original=(DATA.min_image_side - 1, 100))) is not None
    assert s.check(make_pair("k", original=(100, 10))) is not None
    bad = make_pair("b000-000009")
    del bad.meta["original_width"]
    with pytest.raises(InvalidSampleError, match="b000-000009.*original_width"):
        a.check(bad)


# ---------------------------------------------------------------- duplicates


def test_exact_duplicate():
    f = ExactDuplicate()
    p1 = make_pair("k1", sha="aa" * 32)
    assert f.check(p1) is None
    f.accept(p1)
    assert "k1" in f.check(make_pair("k2", sha="aa" * 32, seed=5))
    assert f.check(make_pair("k3", sha="bb" * 32)) is None


def near_copy_bytes(img: Image.Image) -> bytes:
    """Re-encoded as JPEG and resized: different bytes, nearly the same picture."""
    small = img.resize((img.width * 3 // 4, img.height * 3 // 4), Image.BILINEAR)
    return encode(small.resize(img.size, Image.BICUBIC), "JPEG", quality=70)


def test_near_duplicate_reencoded_resized_dropped_different_kept():
    f = NearDuplicate(max_distance=DATA.near_duplicate_max_distance)
    orig = shape_image(1, DATA.image_size)
    p1 = make_pair("k1", image_bytes=encode(orig))
    assert f.check(p1) is None
    f.accept(p1)
    near = make_pair("k2", image_bytes=near_copy_bytes(orig))
    assert near.image_bytes != p1.image_bytes
    reason = f.check(near)
    assert reason is not None and "k1" in reason
    other = make_pair("k3", seed=2)
    assert hamming(compute_phash(other.image), compute_phash(orig)) > DATA.near_duplicate_max_distance
    assert f.check(other) is None


def test_eval_set_overlap():
    eval_imgs = {f"coco-{i}": shape_image(100 + i, DATA.image_size) for i in range(3)}
    f = EvalSetOverlap({k: compute_phash(v) for k, v in eval_imgs.items()}, max_distance=6)
    planted = make_pair("k1", image_bytes=near_copy_bytes(eval_imgs["coco-1"]))
    assert "coco-1" in f.check(planted)
    assert f.check(make_pair("k2", seed=7)) is None
    assert EvalSetOverlap([]).check(planted) is None


def test_hamming_index_is_exact_against_brute_force():
    rnd = random.Random(0)
    base = [rnd.getrandbits(64) for _ in range(300)]
    index = HammingIndex(max_distance=6, bands=4)
    stored = []
    for i, b in enumerate(base):
        h = b
        for bit in rnd.sample(range(64), rnd.randrange(0, 4)):
            h ^= 1 << bit
        stored.append(h)
        index.add(h, f"s{i}")
    for b in base[:150] + [rnd.getrandbits(64) for _ in range(50)]:
        # perturb the query by 0..8 bits so that some are just inside and some outside
        q = b
        for bit in rnd.sample(range(64), rnd.randrange(0, 9)):
            q ^= 1 << bit
        brute = min(((h ^ q).bit_count(), f"s{i}") for i, h in enumerate(stored))
        got = index.nearest_within(q)
        if brute[0] <= 6:
            assert got is not None and got[0] == brute[0]
        else:
            assert got is None


# ---------------------------------------------------------------- pipeline


def make_batch():
    """Good pairs and one bad pair for every filter."""
    good = [make_pair(f"b000-{i:06d}", seed=i) for i in range(6)]
    eval_img = shape_image(500, DATA.image_size)
    dup_sha = good[0].meta["sha256"]
    bad = [
        make_pair("b000-100001", "red circle", seed=11),
        make_pair("b000-100002", "photo taken on 12 March 2009", seed=12),
        make_pair("b000-100003", "un cercle rouge au-dessus d'un carré bleu", seed=13),
        make_pair("b000-100004", seed=14, original=(300, 100)),
        make_pair("b000-100005", seed=15, original=(10, 12)),
        make_pair("b000-100006", seed=16, sha=dup_sha),
        make_pair("b000-100007", image_bytes=near_copy_bytes(eval_img)),
        make_pair("b000-100008", image_bytes=near_copy_bytes(shape_image(2, DATA.image_size))),
    ]
    return good, bad, {"coco-0": compute_phash(eval_img)}


def test_pipeline_counts_examples_and_order():
    good, bad, eval_hashes = make_batch()
    pipe = build_filters(DATA, eval_hashes)
    assert [f.name for f in pipe.filters] == list(FILTER_ORDER)
    kept = list(pipe.apply(good + bad))
    assert [p.key for p in kept] == [p.key for p in good]
    for p in kept:
        assert p.meta["phash"] == compute_phash(p.image)
    r = pipe.report
    assert (r.input_count, r.kept_count, r.removed_count) == (14, 6, 8)
    expected = dict(zip(FILTER_ORDER, [f"b000-10000{i}" for i in range(1, 9)]))
    for name, key in expected.items():
        assert r.removed[name] == 1, name
        assert r.removed_keys[name] == [key]
        ex = r.examples[name][0]
        assert ex["key"] == key and ex["reason"] and "caption" in ex
    d = json.loads(json.dumps(r.to_dict()))
    assert d["removed_count"] == 8 and d["removed"]["near_duplicate"] == 1


def test_pipeline_examples_capped_and_order_is_fixed():
    pipe = FilterPipeline([NearDuplicate(), CaptionTooShort(3, 400), ExactDuplicate()])
    assert [f.name for f in pipe.filters] == ["caption_too_short", "exact_duplicate", "near_duplicate"]
    pairs = [make_pair(f"k{i}", "too short", seed=i) for i in range(8)]
    assert list(pipe.apply(pairs)) == []
    assert pipe.report.removed["caption_too_short"] == 8
    assert len(pipe.report.examples["caption_too_short"]) == 5
    assert len(pipe.report.removed_keys["caption_too_short"]) == 8


def test_pipeline_undecodable_image_is_reported():
    pipe = build_filters(DATA)
    bad = make_pair("b000-000077", image_bytes=b"\x89PNG not really")
    assert list(pipe.apply([bad])) == []
    assert pipe.report.removed["undecodable_image"] == 1
    assert pipe.report.examples["undecodable_image"][0]["key"] == "b000-000077"


def test_dedup_state_export_import_continues_catching_duplicates():
    batch1 = [make_pair(f"b000-{i:06d}", seed=i) for i in range(4)]
    pipe1 = build_filters(DATA)
    assert len(list(pipe1.apply(batch1))) == 4
    state = json.loads(json.dumps(pipe1.state_dict()))
    assert set(state) == {"exact_duplicate", "near_duplicate"}

    pipe2 = build_filters(DATA)
    pipe2.load_state_dict(state)
    exact = make_pair("b001-000000", seed=20, sha=batch1[0].meta["sha256"])
    near = make_pair("b001-000001", image_bytes=near_copy_bytes(shape_image(2, DATA.image_size)))
    new = make_pair("b001-000002", seed=30)
    kept = list(pipe2.apply([exact, near, new]))
    assert [p.key for p in kept] == ["b001-000002"]
    assert pipe2.report.removed_keys["exact_duplicate"] == ["b001-000000"]
    assert pipe2.report.removed_keys["near_duplicate"] == ["b001-000001"]
    assert "b000-000002" in pipe2.report.examples["near_duplicate"][0]["reason"]
    # the state grows with the new batch
    assert len(pipe2.state_dict()["near_duplicate"]["hashes"]) == 5
    # a fresh pipeline without the state would have kept them all
    assert len(list(build_filters(DATA).apply([exact, near, new]))) == 3


def test_pipeline_records_invalid_metadata_instead_of_losing_it():
    pipe = build_filters(DATA)
    bad = make_pair("b000-000078")
    del bad.meta["original_height"]
    good = make_pair("b000-000079", seed=3)
    assert [p.key for p in pipe.apply([bad, good])] == ["b000-000079"]
    ex = pipe.report.examples["invalid_sample"][0]
    assert ex["key"] == "b000-000078" and "original_height" in ex["reason"]
    old = pipe.reset_report()
    assert old.input_count == 2 and pipe.report.input_count == 0
    # dedup state survives the report reset
    assert list(pipe.apply([make_pair("b000-000080", seed=3)])) == []
