"""The demo world: determinism, faults and their expected fate, held-out
compositions, captions, the image checker, and the files it writes."""

import io
import itertools
import re
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dalle_core.data.coco import load_coco_captions
from dalle_core.demo.captions import TEMPLATES, date_caption, foreign_caption, random_caption
from dalle_core.demo.checker import ImageAnalysis, check_image
from dalle_core.demo.items import COPY_MAX_PHASH_DISTANCE, EXPECTED_ORDER, FAULT_EXPECTED, FAULTS
from dalle_core.demo.render import render
from dalle_core.demo.scenes import (
    COLOURS, OPPOSITE, RELATIONS, SHAPES, CaptionSpec, Scene, SceneObject, composition, is_held_out, is_validation,
    parse_caption, random_scene, split_of,
)
from dalle_core.demo.world import DemoWorld

PIPELINE_MAX_PHASH_DISTANCE = 6  # DataConfig.near_duplicate_max_distance in every profile


@pytest.fixture(scope="module")
def world():
    return DemoWorld(seed=7, items_per_batch=120, n_batches=2, n_eval=16)


def decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.convert("RGB")


def square_phash(image):
    """pHash of the centre square: what the filters hash (after the crawler's centre crop)."""
    import imagehash

    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return imagehash.phash(image.crop((left, top, left + side, top + side)))


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_other_seed_other_world(world):
    again = DemoWorld(seed=7, items_per_batch=120, n_batches=2, n_eval=16)
    for batch in range(2):
        a, b = world.batch_items(batch), again.batch_items(batch)
        assert [(i.key, i.caption, i.fault, i.expected) for i in a] == [(i.key, i.caption, i.fault, i.expected) for i in b]
    sample = [i for i in world.all_items() if i.fault is not None][:40] + world.batch_items(1)[:5]
    for item in sample:
        assert again.item(item.key).response(0) == item.response(0), item.key
        assert again.item(item.key).response(1) == item.response(1), item.key
    assert [e.image_bytes() for e in again.eval_items()[:4]] == [e.image_bytes() for e in world.eval_items()[:4]]
    other = DemoWorld(seed=8, items_per_batch=120, n_batches=2, n_eval=16)
    assert [i.caption for i in other.batch_items(0)] != [i.caption for i in world.batch_items(0)]


# --------------------------------------------------------------------------- faults


def test_every_fault_in_every_batch_with_its_expected_fate(world):
    for batch in range(world.n_batches):
        items = world.batch_items(batch)
        counts = Counter(i.fault for i in items)
        assert set(counts) == set(FAULTS) | {None}
        assert all(counts[f] >= 2 for f in FAULTS), counts
        assert counts[None] >= len(items) // 2
        assert all(i.expected == FAULT_EXPECTED.get(i.fault, "keep") for i in items)
    keys = [i.key for i in world.all_items()]
    assert len(set(keys)) == len(keys) == 240
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", k) for k in keys)  # safe in URLs and file names
    expected = world.expected_counts()
    assert expected["keep"] == sum(1 for i in world.all_items() if i.fault in (None, "flaky_500"))
    assert set(expected) <= set(EXPECTED_ORDER) | {"keep"}


def test_item_lookup(world):
    item = world.batch_items(1)[17]
    assert world.item(item.key) is item
    for bad in ("b001-000120", "b002-000000", "nope", "b000-00001"):
        with pytest.raises(KeyError):
            world.item(bad)


def _by_fault(world):
    out = {}
    for item in world.all_items():
        out.setdefault(item.fault, []).append(item)
    return out


def test_responses_by_fault(world):
    items = _by_fault(world)
    for item in items["http_404"]:
        assert item.response().status == 404
    for item in items["http_500"]:
        assert item.response(0).status == 500 and item.response(3).status == 500
    for item in items["flaky_500"]:
        assert item.response(0).status == 500
        ok = item.response(1)
        assert ok.status == 200 and decode(ok.body).size == (item.width, item.height)
    for item in items["slow"]:
        r = item.response(0, slow_delay_s=2.5)
        assert r.status == 200 and r.delay_s == 2.5
        decode(r.body)
    for fault in ("truncated", "corrupt"):
        for item in items[fault]:
            r = item.response()
            assert r.status == 200 and r.content_type.startswith("image/")
            with pytest.raises(Exception):
                decode(r.body)
    for item in items["not_image"]:
        r = item.response()
        assert r.status == 200 and r.content_type.startswith("text/html") and b"<html>" in r.body


def test_clean_images(world):
    clean = _by_fault(world)[None]
    formats = Counter()
    for item in clean[:60]:
        r = item.response()
        assert r.status == 200 and r.delay_s == 0
        image = Image.open(io.BytesIO(r.body))
        formats[image.format] += 1
        assert image.format == {"image/png": "PNG", "image/jpeg": "JPEG"}[r.content_type]
        w, h = image.size
        assert (w, h) == (item.width, item.height)
        assert 96 <= min(w, h) and max(w, h) <= 192 and 0.85 <= w / h <= 1.15
    assert formats["PNG"] > 5 and formats["JPEG"] > 5


def test_image_faults(world, tmp_path):
    items = _by_fault(world)
    for item in items["extreme_aspect"]:
        w, h = decode(item.response().body).size
        assert not 0.5 <= w / h <= 2 and min(w, h) >= 64  # only the aspect-ratio filter applies
    for item in items["tiny_image"]:
        w, h = decode(item.response().body).size
        assert max(w, h) <= 20
    for item in items["exact_duplicate"]:
        assert item.source.fault is None and item.source.key < item.key
        assert item.response().body == item.source.response().body and item.caption == item.source.caption
    for item in items["near_duplicate"]:
        assert item.source.fault is None and item.source.key < item.key and item.caption == item.source.caption
        body, original = item.response().body, item.source.response().body
        assert body != original
        assert square_phash(decode(body)) - square_phash(decode(original)) <= COPY_MAX_PHASH_DISTANCE
    planted = [item.source.key for item in items["eval_plant"]]
    assert len(set(planted)) == len(planted)  # each evaluation image is planted at most once
    for item in items["eval_plant"]:
        assert item.caption == item.source.caption
        altered, original = decode(item.response().body), item.source.image()
        assert altered.size != original.size
        assert square_phash(altered) - square_phash(original) <= COPY_MAX_PHASH_DISTANCE


def test_distinct_images_are_not_near_duplicates(world):
    """Images that must be kept are farther apart in pHash than any filter threshold,
    from each other and from the evaluation images."""
    kept = [i for i in world.all_items()
            if i.expected in ("keep", "too_short", "not_english", "boilerplate_date")]
    hashes = np.array([square_phash(decode(i.image_bytes())).hash.ravel() for i in kept])
    evals = np.array([square_phash(e.image()).hash.ravel() for e in world.eval_items()])
    within = (hashes[:, None] != hashes[None]).sum(-1)[np.triu_indices(len(hashes), 1)]
    across = (hashes[:, None] != evals[None]).sum(-1)
    assert within.min() > PIPELINE_MAX_PHASH_DISTANCE + 2
    assert across.min() > PIPELINE_MAX_PHASH_DISTANCE + 2


# --------------------------------------------------------------------------- captions


def test_captions_parse_back():
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = random_scene(rng, held_out=None)
        for template in TEMPLATES + ("{a} {rel} {b}",):
            for sizes in itertools.product((True, False), repeat=2):
                caption = scene.caption(template, sizes)
                spec = parse_caption(caption)
                assert spec is not None, caption
                assert (spec.colour_a, spec.shape_a, spec.relation, spec.colour_b, spec.shape_b) == (
                    scene.a.colour, scene.a.shape, scene.relation, scene.b.colour, scene.b.shape), caption
                assert (spec.size_a, spec.size_b) == (scene.a.size if sizes[0] else None,
                                                      scene.b.size if sizes[1] else None)
    assert Scene(SceneObject("red", "circle", "small"), "to the left of",
                 SceneObject("blue", "square")).caption() == "a small red circle to the left of a large blue square"
    assert parse_caption("There is an Orange triangle, above a purple circle.").colour_a == "orange"
    for junk in ("shapes", "photo taken on 12 march 2009 14:22", "un cercle rouge à gauche d'un carré bleu", ""):
        assert parse_caption(junk) is None


def test_fault_captions_are_what_their_filters_look_for(world):
    """Clean captions are confidently English, foreign ones are not; date captions
    and short ones are long enough / short enough for their own filter alone."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    p_en = lambda text: dict(ident.rank(text)).get("en", 0.0)  # noqa: E731
    items = _by_fault(world)
    rng = np.random.default_rng(1)
    clean = [i.caption for i in items[None]] + [random_caption(random_scene(rng), rng) for _ in range(300)]
    assert min(p_en(c) for c in clean) > 0.6
    foreign = [i.caption for i in items["non_english"]] + [foreign_caption(random_scene(rng), rng) for _ in range(300)]
    assert max(p_en(c) for c in foreign) < 0.2
    assert all(parse_caption(c) is None for c in foreign)
    dates = [i.caption for i in items["date_caption"]] + [date_caption(rng) for _ in range(50)]
    assert all(len(c.split()) >= 3 and re.search(r"(19|20)\d\d", c) and parse_caption(c) is None for c in dates)
    assert all(len(i.caption.split()) <= 2 for i in items["short_caption"])


# --------------------------------------------------------------------------- held-out compositions


def test_held_out_compositions():
    objects = [(c, s) for c in COLOURS for s in SHAPES]
    compositions = [Scene(SceneObject(ca, sa), rel, SceneObject(cb, sb))
                    for (ca, sa), (cb, sb) in itertools.permutations(objects, 2) if ca != cb
                    for rel in RELATIONS]
    held = [s for s in compositions if is_held_out(s)]
    assert 0.05 < len(held) / len(compositions) < 0.15
    # "a left of b" and "b right of a" look the same: held out together
    for s in compositions:
        assert is_held_out(s) == is_held_out(Scene(s.b, OPPOSITE[s.relation], s.a))
        assert is_held_out(s) == is_held_out(s.caption())
    # every object and every relation still appears in training
    training = [s for s in compositions if not is_held_out(s)]
    assert {(s.a.colour, s.a.shape) for s in training} == set(objects)
    assert {(s.b.colour, s.b.shape) for s in training} == set(objects)
    assert {s.relation for s in training} == set(RELATIONS)


def test_training_never_uses_held_out_and_eval_only_does(world):
    for item in world.all_items():
        assert is_held_out(item.scene) == (item.fault == "eval_plant"), item.key
        if parse_caption(item.caption) is not None:
            assert is_held_out(item.caption) == (item.fault == "eval_plant"), item.caption
    evals = world.eval_items()
    assert len(evals) == 16
    assert all(is_held_out(e.scene) and is_held_out(e.caption) for e in evals)


def all_compositions():
    objects = [(c, s) for c in COLOURS for s in SHAPES]
    return [Scene(SceneObject(ca, sa), rel, SceneObject(cb, sb))
            for (ca, sa), (cb, sb) in itertools.permutations(objects, 2) if ca != cb for rel in RELATIONS]


def test_validation_compositions_are_neither_evaluated_nor_trained_on():
    compositions = all_compositions()
    validation = [s for s in compositions if is_validation(s)]
    assert 0.02 < len(validation) / len(compositions) < 0.08
    for s in compositions:
        assert not (is_validation(s) and is_held_out(s))
        assert is_validation(s) == is_validation(Scene(s.b, OPPOSITE[s.relation], s.a)) == is_validation(s.caption())
        assert split_of(s) == ("eval" if is_held_out(s) else "validation" if is_validation(s) else "train")
    # training still sees every object and relation
    training = [s for s in compositions if split_of(s) == "train"]
    assert {(s.a.colour, s.a.shape) for s in training} == {(s.a.colour, s.a.shape) for s in compositions}
    assert {s.relation for s in training} == set(RELATIONS)
    with pytest.raises(ValueError, match="unknown split"):
        random_scene(np.random.default_rng(0), split="test")


@pytest.mark.parametrize("seed", [0, 7])
def test_validation_items_are_disjoint_from_evaluation_and_every_training_batch(seed):
    world = DemoWorld(seed=seed, items_per_batch=120, n_batches=3, n_eval=16)
    validation = world.validation_items(40)
    assert len(validation) == 40 and len({v.key for v in validation}) == 40
    val_comps = {composition(v.scene) for v in validation}
    assert all(is_validation(v.scene) and is_validation(v.caption) for v in validation)
    assert val_comps.isdisjoint(composition(e.scene) for e in world.eval_items())
    for item in world.all_items():  # every crawled scene, planted copies and duplicates included
        assert composition(item.scene) not in val_comps and not is_validation(item.scene), item.key
        if parse_caption(item.caption) is not None:
            assert not is_validation(item.caption), item.caption
    # deterministic: the same world gives the same items, and the split does not depend on the seed
    assert [(v.key, v.caption, v.seed) for v in DemoWorld(seed=seed, n_eval=16).validation_items(40)] == \
        [(v.key, v.caption, v.seed) for v in validation]
    assert len(world.validation_items()) == world.n_eval


# --------------------------------------------------------------------------- rendering and the checker


def jpeg(image, quality=75):
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return decode(buf.getvalue())


def swapped(scene: Scene, rng) -> dict[str, CaptionSpec]:
    """The scene's caption with one thing wrong: a colour, a shape, the relation."""
    s = scene.spec()
    other_colours = [c for c in COLOURS if c not in (s.colour_a, s.colour_b)]
    other_shapes = [x for x in SHAPES if x != s.shape_b]
    return {
        "colour": CaptionSpec(other_colours[rng.integers(len(other_colours))], s.shape_a, s.relation,
                              s.colour_b, s.shape_b),
        "shape": CaptionSpec(s.colour_a, s.shape_a, s.relation, s.colour_b,
                             other_shapes[rng.integers(len(other_shapes))]),
        "relation": CaptionSpec(s.colour_a, s.shape_a, OPPOSITE[s.relation], s.colour_b, s.shape_b),
    }


def test_checker_accepts_renders_and_rejects_wrong_captions():
    rng = np.random.default_rng(2024)
    accepted, rejected = Counter(), Counter()
    n = 200
    for _ in range(n):
        scene = random_scene(rng, held_out=None)
        wrong = swapped(scene, rng)
        for size in (32, 64, 256):
            image = render(scene, size, size, rng)
            for fmt, shown in (("png", image), ("jpeg", jpeg(image))):
                analysis = ImageAnalysis(shown)
                accepted[size, fmt] += analysis.check(scene.spec()).match
                for what, spec in wrong.items():
                    rejected[size, fmt, what] += not analysis.check(spec).match
    low_accept = {k: v / n for k, v in accepted.items() if v / n < 0.98}
    low_reject = {k: v / n for k, v in rejected.items() if v / n < 0.95}
    assert not low_accept and not low_reject, (low_accept, low_reject)


def test_check_image_results():
    rng = np.random.default_rng(3)
    scene = Scene(SceneObject("yellow", "triangle", "small"), "above", SceneObject("purple", "square"), "charcoal")
    image = render(scene, 160, 150, rng)
    ok = check_image(image, "there is a small yellow triangle above a purple square")
    assert ok.match and ok.colours and ok.shapes and ok.relation
    by_scene = check_image(image, scene)  # a scene states both sizes, the caption only a's (the detail differs)
    assert (by_scene.match, by_scene.colours, by_scene.shapes, by_scene.relation, by_scene.sizes) == \
        (ok.match, ok.colours, ok.shapes, ok.relation, ok.sizes) == (True, True, True, True, True)
    wrong_shape = check_image(image, "a yellow circle above a purple square")
    assert not wrong_shape.match and wrong_shape.colours and not wrong_shape.shapes and wrong_shape.relation
    assert "looks like a triangle" in wrong_shape.detail
    wrong_relation = check_image(image, "a yellow triangle below a purple square")
    assert (wrong_relation.match, wrong_relation.shapes, wrong_relation.relation) == (False, True, False)
    missing = check_image(image, "a green triangle above a purple square")
    assert not missing.match and not missing.colours and "no green region" in missing.detail
    assert not check_image(image, "un triangle jaune").match
    blank = Image.new("RGB", (64, 64), (128, 128, 128))
    noise = Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8))
    assert not check_image(blank, scene).match and not check_image(noise, scene).match


def test_checker_judges_sizes_on_the_worlds_own_images(world):
    """Sizes: the world's evaluation and training images, as served and as the models see them
    (centre square at 32 px), pass; the same images with the stated sizes swapped fail; a
    caption without sizes leaves `sizes` None, and `match` never depends on sizes."""
    from dataclasses import replace

    from dalle_core.data.image_decode import resize_center_crop

    evals = [(e.image(), e.scene) for e in world.eval_items()]
    train = [(decode(i.image_bytes()), i.scene) for i in world.batch_items(0) if i.fault is None][:60]
    passed, swapped_failed, n_swapped, n = 0, 0, 0, 0
    for image, scene in evals + train:
        for shown in (image, resize_center_crop(image, 32)):
            spec = scene.spec()
            r = check_image(shown, spec)
            n += 1
            passed += bool(r.sizes)
            if scene.a.size != scene.b.size:
                n_swapped += 1
                other = check_image(shown, replace(spec, size_a=spec.size_b, size_b=spec.size_a))
                swapped_failed += other.sizes is False
                assert other.match == r.match  # sizes are not part of the match
    assert n >= 100 and passed / n >= 0.95, (passed, n)
    assert n_swapped >= 30 and swapped_failed / n_swapped >= 0.95, (swapped_failed, n_swapped)

    rng = np.random.default_rng(11)
    scene = Scene(SceneObject("red", "circle", "small"), "to the left of", SceneObject("blue", "square", "large"))
    image = render(scene, 96, 96, rng)
    ok = check_image(image, "a small red circle to the left of a large blue square")
    assert ok.match and ok.sizes is True
    wrong = check_image(image, "a large red circle to the left of a small blue square")
    assert wrong.match and wrong.sizes is False and "small looks large" in wrong.detail
    one = check_image(image, "a red circle to the left of a small blue square")  # only b's size stated
    assert one.match and one.sizes is False
    assert check_image(image, "a red circle to the left of a large blue square").sizes is True
    assert check_image(image, "a red circle to the left of a blue square").sizes is None
    missing = check_image(image, "a small green circle to the left of a large blue square")
    assert missing.sizes is False and not missing.colours  # judged only where the colours were found


def test_checker_tolerates_blur_and_objects_stay_in_the_centre_square():
    from PIL import ImageFilter

    rng = np.random.default_rng(5)
    for _ in range(20):
        scene = random_scene(rng, held_out=None)
        assert check_image(render(scene, 64, 64, rng).filter(ImageFilter.GaussianBlur(1.2)), scene).match
        wide = render(scene, 300, 100, rng)  # only the centre square survives a centre crop
        assert check_image(wide.crop((100, 0, 200, 100)), scene).match


# --------------------------------------------------------------------------- files


def test_write_eval_set_in_coco_format(world, tmp_path):
    path = world.write_eval_set(tmp_path / "eval")
    assert path == tmp_path / "eval" / "captions.json"
    images = load_coco_captions(path, tmp_path / "eval" / "images")
    evals = world.eval_items()
    assert [im.image_id for im in images] == [e.image_id for e in evals]
    for im, e in zip(images, evals):
        assert im.captions == [e.caption] and is_held_out(im.captions[0])
        image = decode(im.path.read_bytes())
        assert image.size == (im.width, im.height) == (128, 128)
        assert check_image(image, im.captions[0]).match


def test_write_validation_set_in_coco_format(world, tmp_path):
    path = world.write_validation_set(tmp_path / "val", n=12)
    assert path == tmp_path / "val" / "captions.json"
    images = load_coco_captions(path, tmp_path / "val" / "images")
    items = world.validation_items(12)
    assert [im.image_id for im in images] == [v.image_id for v in items]
    assert {im.path.name for im in images}.isdisjoint(e.file_name for e in world.eval_items())
    for im, v in zip(images, items):
        assert im.captions == [v.caption] and is_validation(im.captions[0]) and not is_held_out(im.captions[0])
        image = decode(im.path.read_bytes())
        assert image.size == (im.width, im.height) == (128, 128)
        assert check_image(image, im.captions[0]).match


def test_write_url_lists_in_every_format(tmp_path):
    world = DemoWorld(seed=1, items_per_batch=40, n_batches=4, n_eval=8)
    paths = world.write_url_lists(tmp_path / "lists", "http://127.0.0.1:8765/")
    assert [p.name for p in paths] == ["batch-000.parquet", "batch-001.csv", "batch-002.tsv", "batch-003.parquet"]
    readers = {".parquet": pd.read_parquet, ".csv": pd.read_csv, ".tsv": lambda p: pd.read_csv(p, sep="\t")}
    for batch, path in enumerate(paths):
        frame = readers[path.suffix](path)
        assert list(frame.columns) == ["url", "caption"]
        items = world.batch_items(batch)
        assert frame["url"].tolist() == [f"http://127.0.0.1:8765/img/{i.key}" for i in items]
        assert frame["caption"].tolist() == [i.caption for i in items]
