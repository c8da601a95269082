"""The contrastive reranker: shapes and invariances (every text pooling), the
symmetric InfoNCE loss and the hard-negative term, reranking, input errors,
save / load with the config pinned (and files of the old config shape), training
that resumes to the same result, bf16 autocast, the binding negatives and the
attribute-binding figure, and that it learns the demo world's colours."""

import math
import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dalle_core.demo.render import render
from dalle_core.demo.scenes import COLOURS, Scene, SceneObject, random_scene
from dalle_core.rerank import (
    ContrastiveReranker,
    RerankerConfig,
    load_reranker,
    save_reranker,
    train_reranker,
)
from dalle_core.rerank import model as rerank_model
from dalle_core.rerank.evaluate import attribute_binding_by_kind, retrieval_figures
from dalle_core.rerank.negatives import (
    binding_negatives,
    mirrored_caption,
    negatives_for_batch,
    swapped_word_negatives,
    typed_swap,
    training_batch,
    typed_swap_negatives,
    with_mirrored_pairs,
)
from dalle_core.rerank.train import list_checkpoints, lr_at
from dalle_core.profiles import UnknownProfileError, get_profile, profile_names
from dalle_core.text.bpe import train_bpe_tokenizer

torch.set_num_threads(1)

TINY = get_profile("tiny").reranker
# an even smaller shape for the mechanics (resume, save / load)
MICRO = TINY.replace(image_stem=8, image_widths=(8, 16), text_width=16, text_layers=1, text_heads=2,
                     embed_dim=16, batch_size=8, warmup_steps=2, log_every=2, checkpoint_every=2)


def random_batch(cfg, b=4, seed=0, size=None):
    g = torch.Generator().manual_seed(seed)
    s = size or cfg.image_size
    images = torch.rand(b, 3, s, s, generator=g)
    n_real = torch.randint(1, cfg.text_len + 1, (b,), generator=g)
    ids = torch.randint(0, cfg.text_vocab_size, (b, cfg.text_len), generator=g)
    pads = cfg.text_vocab_size + torch.arange(cfg.text_len)
    pos = torch.arange(cfg.text_len).unsqueeze(0)
    ids = torch.where(pos < n_real.unsqueeze(1), ids, pads)
    return images, ids


def make(cfg=MICRO, seed=0):
    torch.manual_seed(seed)
    return ContrastiveReranker(cfg).eval()


# --- config ------------------------------------------------------------------------------------

def test_config_profiles_and_round_trip():
    for name in profile_names():
        profile = get_profile(name)
        cfg = profile.reranker
        assert RerankerConfig.from_dict(cfg.to_dict()) == cfg
        # the profile derives the reranker's text ids from its text config, its image size from the data's
        t = profile.text
        assert (cfg.text_vocab_size, cfg.text_len) == (t.vocab_size, t.text_len)
        assert cfg.image_size == profile.data.image_size
    assert get_profile("small").reranker.image_size == 64
    d = TINY.to_dict()
    d["a_future_field"] = 1
    d.pop("lr")
    assert RerankerConfig.from_dict(d).lr == RerankerConfig().lr
    with pytest.raises(ValueError, match="shape fields"):
        RerankerConfig.from_dict({"image_size": 32})
    with pytest.raises(ValueError, match="divisible"):
        RerankerConfig(image_size=36)
    with pytest.raises(UnknownProfileError, match="unknown profile"):
        get_profile("huge")
    assert ContrastiveReranker(TINY).num_parameters() < 500_000


# --- the model ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("pool", ["mean", "cls", "attention"])
def test_features_scores_and_invariances(pool):
    cfg = MICRO.replace(text_pool=pool)
    model = make(cfg)
    images, ids = random_batch(cfg, b=5)
    feats = model.image_features(images)
    assert feats.shape == (5, cfg.embed_dim)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(5))
    assert model.image_features(images, normalize=False).norm(dim=-1).std() > 0
    s = model.score(images, ids)
    assert s.shape == (5,) and (s.abs() <= 1 + 1e-6).all()
    manual = (F.normalize(model.encode_image(images), dim=-1) * F.normalize(model.encode_text(ids), dim=-1)).sum(-1)
    torch.testing.assert_close(s, manual.detach())
    # one caption against every image
    torch.testing.assert_close(model.score(images, ids[2]), model.score(images, ids[2:3].expand(5, -1)))
    # an image's score does not depend on its batch (no batch statistics) nor on chunking
    torch.testing.assert_close(model.score(images[3:4], ids[3:4]), s[3:4])
    torch.testing.assert_close(model.score(images, ids, batch_size=2), s)
    # pads are ignored: which pad ids fill the tail does not matter
    shuffled = ids.clone()
    pad = ids >= cfg.text_vocab_size
    shuffled[pad] = cfg.text_vocab_size + (cfg.text_len - 1)
    torch.testing.assert_close(model.text_features(shuffled), model.text_features(ids))
    # nor on the other captions of its batch (all-pad tail positions are dropped)
    alone = torch.cat([model.text_features(ids[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(alone, model.text_features(ids))
    # but the words and their order do
    swapped = ids.clone()
    swapped[:, [0, 1]] = swapped[:, [1, 0]]
    real2 = (~pad[:, :2]).all(1) & (ids[:, 0] != ids[:, 1])
    assert not torch.allclose(model.text_features(swapped)[real2], model.text_features(ids)[real2])
    # other image sizes are resized to the config's
    big = F.interpolate(images, size=(2 * cfg.image_size,) * 2, mode="nearest")
    assert model.image_features(big).shape == (5, cfg.embed_dim)


def test_symmetric_info_nce_and_hard_negatives():
    model = make()
    images, ids = random_batch(MICRO, b=4, seed=1)
    out = model.loss(images, ids)
    img = F.normalize(model.encode_image(images), dim=-1)
    txt = F.normalize(model.encode_text(ids), dim=-1)
    logits = img @ txt.t() / 0.07
    target = torch.arange(4)
    expected = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-5)
    assert 0 <= float(out["acc"]) <= 1
    # hard negatives add columns to the image -> text direction only
    _, neg = random_batch(MICRO, b=4, seed=2)
    out_n = model.loss(images, ids, negatives=neg)
    torch.testing.assert_close(out_n["loss_text"], out["loss_text"])
    assert out_n["loss_image"] > out["loss_image"]
    # the hard-negative term: the true caption against its own negatives only
    assert "loss_hard" not in out
    neg_txt = F.normalize(model.encode_text(neg), dim=-1)
    own = torch.stack([(img * txt).sum(-1), (img * neg_txt).sum(-1)], dim=1) / 0.07
    torch.testing.assert_close(out_n["loss_hard"], F.cross_entropy(own, torch.zeros(4, dtype=torch.long)),
                               rtol=1e-5, atol=1e-5)
    assert float(out_n["acc_hard"]) == pytest.approx(float((own[:, 0] > own[:, 1]).float().mean()))
    torch.testing.assert_close(out_n["loss"], (out_n["loss_image"] + out_n["loss_text"]) / 2)  # weight 0
    weighted = make(MICRO.replace(hard_negative_weight=2.0))
    w = weighted.loss(images, ids, negatives=neg)
    torch.testing.assert_close(w["loss"], (w["loss_image"] + w["loss_text"]) / 2 + 2.0 * w["loss_hard"])
    assert torch.isclose(model.scale(), torch.tensor(1 / 0.07))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert math.isclose(float(model.scale().detach()), 100.0, rel_tol=1e-5)  # clamped as in CLIP


def test_rerank_and_rerank_groups():
    model = make()
    images, ids = random_batch(MICRO, b=6, seed=3)
    s = model.score(images, ids[0])
    top = model.rerank(images, ids[0], keep=3)
    assert top.tolist() == torch.argsort(s, descending=True)[:3].tolist()
    assert model.rerank(images, ids[:1], keep=6).tolist() == torch.argsort(s, descending=True).tolist()
    idx, scores = model.rerank_groups(images, ids[:2], keep=2)  # captions 0, 1 with 3 candidates each
    assert idx.shape == scores.shape == (2, 2)
    for c in range(2):
        sc = model.score(images[3 * c:3 * c + 3], ids[c])
        assert idx[c].tolist() == (torch.argsort(sc, descending=True)[:2] + 3 * c).tolist()
        torch.testing.assert_close(scores[c], sc.sort(descending=True).values[:2])


def test_input_errors():
    model = make()
    images, ids = random_batch(MICRO, b=2)
    with pytest.raises(ValueError, match=f"expected {MICRO.text_len} ids"):
        model.score(images, ids[:, :-1])
    with pytest.raises(ValueError, match="ids must be in"):
        model.score(images, ids + 10_000)
    with pytest.raises(ValueError, match="only pad ids"):
        model.score(images, torch.full_like(ids, MICRO.text_vocab_size))
    with pytest.raises(ValueError, match="integer token ids"):
        model.score(images, ids.float())
    with pytest.raises(ValueError, match="divide by 255"):
        model.score(images * 255, ids)
    with pytest.raises(ValueError, match="channels"):
        model.score(images[:, :1], ids)
    with pytest.raises(ValueError, match="2 captions for 3 images|3 images"):
        model.score(torch.cat([images, images[:1]]), ids)
    with pytest.raises(ValueError, match="keep"):
        model.rerank(images, ids[0], keep=3)
    with pytest.raises(ValueError, match="one caption"):
        model.rerank(images, ids, keep=1)
    with pytest.raises(ValueError, match="for 2 captions"):
        model.rerank_groups(images[:1], ids, keep=1)
    with pytest.raises(ValueError, match="batch sizes differ"):
        model.loss(images, ids[:1])


def test_save_load_round_trip_pins_the_config(tmp_path):
    cfg = MICRO.replace(embed_dim=12)  # not a preset: the file must carry it
    model = make(cfg, seed=4)
    images, ids = random_batch(cfg, b=3)
    path = save_reranker(tmp_path / "r.pt", model, meta={"note": "x"})
    loaded = load_reranker(path)
    assert loaded.config == cfg and not loaded.training
    assert torch.equal(loaded.score(images, ids), model.score(images, ids))
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable reranker file"):
        load_reranker(tmp_path / "bad.pt")
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a reranker file"):
        load_reranker(tmp_path / "other.pt")


def _old_file(path, model):
    """A file as the reranker before text_pool wrote it: no text_pool, amp_dtype or
    hard_negative_weight in its config."""
    config = {k: v for k, v in model.config.to_dict().items()
              if k not in ("text_pool", "amp_dtype", "hard_negative_weight")}
    torch.save({"format": rerank_model.RERANKER_FORMAT, "config": config,
                "state_dict": model.state_dict(), "meta": {}}, path)
    return path


def test_files_of_the_old_config_shape(tmp_path):
    images, ids = random_batch(MICRO, b=3)
    old = make(MICRO.replace(text_pool="mean"), seed=5)
    loaded = load_reranker(_old_file(tmp_path / "old.pt", old))  # mean pooling, as it was trained
    assert loaded.config.text_pool == "mean" and loaded.config == old.config
    torch.testing.assert_close(loaded.score(images, ids), old.score(images, ids))
    # an old file with weights of another pooling: refused, naming the cause
    with pytest.raises(ValueError, match="text pooling differs.*text_pool='mean'.*without text_pool"):
        load_reranker(_old_file(tmp_path / "cls.pt", make(MICRO.replace(text_pool="cls"))))
    blob = torch.load(tmp_path / "old.pt", weights_only=False)
    blob["config"]["text_pool"] = "cls"
    torch.save(blob, tmp_path / "says-cls.pt")
    with pytest.raises(ValueError, match="text pooling differs.*text_pool='cls'"):
        load_reranker(tmp_path / "says-cls.pt")
    blob["config"]["text_pool"] = "max"
    torch.save(blob, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="text_pool must be one of"):
        load_reranker(tmp_path / "future.pt")
    # the training checkpoints of the old shape cannot be resumed with a new pooling
    assert "text_pool" in rerank_model.SHAPE_FIELDS


# --- training ----------------------------------------------------------------------------------------

def synthetic_batches(cfg, n_batches=50):
    data = [random_batch(cfg, b=cfg.batch_size, seed=100 + k) for k in range(n_batches)]

    def batches_fn(start):
        return iter(data[start:])
    return batches_fn


def test_training_resumes_to_the_same_result(tmp_path):
    fn = synthetic_batches(MICRO)
    logs = []
    straight = train_reranker(MICRO, fn, tmp_path / "a", total_steps=6, on_log=logs.append)
    assert straight.steps == 6 and straight.resumed_from is None and len(straight.losses) == 6
    rec = [r for r in logs if r["event"] == "log"]
    assert [r["step"] for r in rec] == [1, 2, 4, 6]
    assert {"loss", "acc", "acc_image_to_text", "acc_text_to_image", "temperature", "lr"} <= set(rec[0])
    assert len(list_checkpoints(tmp_path / "a")) == 2  # the newest two kept

    first = train_reranker(MICRO, fn, tmp_path / "b", total_steps=6, stop_after=3)
    assert first.steps == 3 and first.model_path is None
    resumed = train_reranker(MICRO, fn, tmp_path / "b", total_steps=6)
    assert resumed.resumed_from == 3 and resumed.start_step == 3
    assert resumed.losses == straight.losses[3:]
    for (k, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert torch.equal(load_reranker(resumed.model_path).logit_scale, straight.model.logit_scale)
    # a finished run resumes to itself without training
    again = train_reranker(MICRO, fn, tmp_path / "b", total_steps=6)
    assert again.losses == [] and again.steps == 6
    # a corrupted newest checkpoint is skipped
    newest = list_checkpoints(tmp_path / "b")[-1][1]
    newest.write_bytes(b"truncated")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = train_reranker(MICRO, fn, tmp_path / "b", total_steps=6)
    assert r.resumed_from == 4 and any("unreadable" in str(w.message) for w in caught)
    # another shape is refused
    with pytest.raises(ValueError, match="shape differs"):
        train_reranker(MICRO.replace(embed_dim=8), fn, tmp_path / "b", total_steps=6)
    with pytest.raises(ValueError, match="ran out of batches"):
        train_reranker(MICRO, synthetic_batches(MICRO, n_batches=2), tmp_path / "c", total_steps=3)


def test_bf16_autocast(tmp_path, monkeypatch):
    assert rerank_model.autocast_dtype(MICRO) is None  # fp32 is the default
    cfg = MICRO.replace(amp_dtype="bf16")
    expected = torch.bfloat16 if rerank_model.fast_low_precision("cpu") == "bf16" else None
    assert rerank_model.autocast_dtype(MICRO.replace(amp_dtype="auto")) is expected
    assert rerank_model.autocast_dtype(cfg) is expected
    logs = []
    r = train_reranker(cfg, synthetic_batches(cfg), tmp_path / "a", total_steps=2, on_log=logs.append)
    assert logs[0]["amp"] == ("bf16" if expected is not None else "fp32") and math.isfinite(r.final_loss)
    assert all(p.dtype == torch.float32 for p in r.model.parameters())
    # a CPU without bf16 trains in fp32, as the fp32 config does
    monkeypatch.setattr(rerank_model, "fast_low_precision", lambda device="cpu": "fp32")
    logs.clear()
    slow = train_reranker(cfg, synthetic_batches(cfg), tmp_path / "b", total_steps=2, on_log=logs.append)
    plain = train_reranker(MICRO, synthetic_batches(MICRO), tmp_path / "c", total_steps=2)
    assert logs[0]["amp"] == "fp32" and slow.losses == plain.losses
    with pytest.raises(ValueError, match="amp_dtype"):
        MICRO.replace(amp_dtype="fp16")


def test_lr_schedule():
    cfg = MICRO.replace(lr=1.0, warmup_steps=4, lr_end_factor=0.1)
    assert lr_at(cfg, 0, 20) == 0.25 and lr_at(cfg, 3, 20) == 1.0
    assert math.isclose(lr_at(cfg, 4, 20), 1.0) and math.isclose(lr_at(cfg, 20, 20), 0.1)


# --- it learns the demo world ----------------------------------------------------------------------------

def _render(scenes, size, seed):
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(render(s, size, size, rng), dtype=np.float32) / 255.0 for s in scenes]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _recoloured(scene, rng):
    """The scene with its first object's colour replaced by one that is not in the image."""
    free = [c for c in COLOURS if c not in (scene.a.colour, scene.b.colour)]
    a = SceneObject(free[rng.integers(len(free))], scene.a.shape, scene.a.size)
    return Scene(a, scene.relation, scene.b, scene.background)


def test_learns_demo_world_colours(tmp_path):
    cfg = TINY  # 32x32 images, the tiny text config
    rng = np.random.default_rng(0)
    train_scenes = [random_scene(rng, held_out=None) for _ in range(800)]
    test_scenes = [random_scene(rng, held_out=None) for _ in range(100)]
    train_x, test_x = _render(train_scenes, cfg.image_size, 1), _render(test_scenes, cfg.image_size, 2)
    sizes = rng.integers(0, 2, size=(len(train_scenes), 2)).astype(bool)
    captions = [s.caption(sizes=tuple(z)) for s, z in zip(train_scenes, sizes)]
    tok = train_bpe_tokenizer(captions, get_profile("tiny").text)
    ids = tok.encode_batch(captions)

    def batches_fn(start):
        g = torch.Generator().manual_seed(0)
        k = 0
        while True:
            perm = torch.randperm(len(ids), generator=g)
            for i in range(0, len(ids) - cfg.batch_size + 1, cfg.batch_size):
                if k >= start:
                    j = perm[i:i + cfg.batch_size]
                    yield train_x[j], ids[j]
                k += 1

    logs = []
    result = train_reranker(cfg, batches_fn, tmp_path, total_steps=120, on_log=logs.append)
    model = result.model
    first, last = [r for r in logs if r["event"] == "log"][0], [r for r in logs if r["event"] == "log"][-1]
    assert last["loss"] < first["loss"] - 1.0 and last["acc"] > 0.3

    true = tok.encode_batch([s.caption() for s in test_scenes])
    wrong = tok.encode_batch([_recoloured(s, rng).caption() for s in test_scenes])
    better = (model.score(test_x, true) > model.score(test_x, wrong)).float().mean().item()
    assert better > 0.7, better
    # reranking: among 8 candidate images (the right one and 7 others), the right one comes first
    hits = 0
    for i in range(len(test_scenes)):
        cand = [i] + [(i + k * 11) % len(test_scenes) for k in range(1, 8)]
        hits += int(cand[int(model.rerank(test_x[cand], true[i], keep=1))] == i)
    assert hits / len(test_scenes) > 0.5, hits  # chance: 1/8


# --- binding negatives and the attribute-binding figure ------------------------------------------------

def test_typed_swaps_on_hand_examples():
    cap = "a picture of a small red circle to the left of a large blue square"
    assert typed_swap_negatives(cap) == {
        "colour": "a picture of a small blue circle to the left of a large red square",
        "size": "a picture of a large red circle to the left of a small blue square",
        "shape": "a picture of a small red square to the left of a large blue circle",
        "relation": "a picture of a small red circle to the right of a large blue square",
    }
    # the article follows the word that moved; the first pair, not the background's colour
    assert typed_swap_negatives("an orange circle above a red triangle on a light grey background") == {
        "colour": "a red circle above an orange triangle on a light grey background",
        "shape": "an orange triangle above a red circle on a light grey background",
        "relation": "an orange circle below a red triangle on a light grey background",
    }
    # same shapes, no sizes: only colour and relation; case and punctuation kept
    assert typed_swap_negatives("There is a purple square below a green square.") == {
        "colour": "There is a green square below a purple square.",
        "relation": "There is a purple square above a green square.",
    }
    assert typed_swap("Above a red cat", "relation") == "Below a red cat"
    assert typed_swap("a dog in front of a car", "relation") == "a dog behind a car"
    # with an rng: any pair of the class, here the background's grey too
    rng = random.Random(0)
    draws = {typed_swap("an orange circle above a red triangle on a light grey background", "colour", rng)
             for _ in range(50)}
    assert "a grey circle above a red triangle on a light orange background" in draws and len(draws) == 3
    with pytest.raises(ValueError, match="unknown binding kind"):
        typed_swap(cap, "texture")


def test_binding_negatives_fall_back_to_the_generic_swap():
    rng = random.Random(0)
    assert typed_swap_negatives("a cat sitting on a mat") == {}
    assert typed_swap("a red circle", "colour") is None and typed_swap("a red circle", "relation") is None
    # no typed pair: every negative is a generic swap (same words, other order)
    negs = binding_negatives("a cat sitting on a mat", 5, random.Random(1))
    assert negs == swapped_word_negatives("a cat sitting on a mat", 5, random.Random(1))
    cap = "a small red circle to the left of a large blue square"
    typed = set(typed_swap_negatives(cap).values())
    every = binding_negatives(cap, 40, rng, share=1.0)
    assert set(every) == typed  # only binding negatives, every kind drawn
    mixed = binding_negatives(cap, 200, rng, share=0.5)
    share = sum(n in typed for n in mixed) / len(mixed)
    assert 0.35 < share < 0.8  # the generic swaps sometimes land on a typed one too
    # negatives_for_batch: generic by default (the old behaviour, same draws)
    caps = [cap, "a cat sitting on a mat"]
    assert negatives_for_batch(caps, 3, random.Random(2)) == _generic(caps, 3, random.Random(2))
    assert all(len(row) == 3 for row in negatives_for_batch(caps, 3, rng, binding=0.67))


def _generic(caps, k, rng):
    return [swapped_word_negatives(c, k, rng) for c in caps]


COLOUR_IDS = ["red", "orange", "yellow", "green", "blue", "purple"]


class _OrderTok:
    """Caption -> one-hot of its first and second colour, in left-to-right order
    of the things ("X to the right of Y" puts Y first); shapes and sizes unread."""

    def encode_batch(self, caps):
        rows = []
        for cap in caps:
            words = cap.split()
            cols = [w for w in words if w in COLOUR_IDS]
            if "right" in words or "below" in words:
                cols.reverse()
            v = torch.zeros(12)
            v[COLOUR_IDS.index(cols[0])] = 1
            v[6 + COLOUR_IDS.index(cols[1])] = 1
            rows.append(v)
        return torch.stack(rows)


class _FeatureModel:
    """Image 'pixels' are the features themselves."""

    def image_features(self, x):
        return F.normalize(x.flatten(1), dim=-1)

    def text_features(self, t):
        return F.normalize(t, dim=-1)


def test_attribute_binding_against_a_hand_count():
    caps = ["a red square to the left of a blue circle",  # colour, shape, relation
            "a small green square to the right of a large red square"]  # colour, size, relation
    images = _OrderTok().encode_batch(caps).view(2, 12, 1, 1)  # what each image shows
    f = retrieval_figures(_FeatureModel(), _OrderTok(), images, caps)
    # colours and relation are bound (wins), shapes and sizes are not read (ties, 1/2)
    assert f["attribute_binding"] == pytest.approx((1 + 0.5 + 1 + 1 + 0.5 + 1) / 6)
    assert f["retrieval_image_to_text"] == 1.0
    by_kind = attribute_binding_by_kind(_FeatureModel(), _OrderTok(), images, caps)
    assert by_kind == {"attribute_binding_colour": 1.0, "attribute_binding_colour_n": 2,
                       "attribute_binding_size": 0.5, "attribute_binding_size_n": 1,
                       "attribute_binding_shape": 0.5, "attribute_binding_shape_n": 1,
                       "attribute_binding_relation": 1.0, "attribute_binding_relation_n": 2}
    # a bag of colours: every binding negative ties
    class Bag(_FeatureModel):
        def text_features(self, t):
            return F.normalize(t[:, :6] + t[:, 6:], dim=-1).repeat(1, 2)
    assert retrieval_figures(Bag(), _OrderTok(), images, caps)["attribute_binding"] == pytest.approx(0.5)


def test_mirrored_pairs_flip_the_image_and_reverse_the_relation():
    assert mirrored_caption("a red circle to the left of a blue square") == \
        ("horizontal", "a red circle to the right of a blue square")
    assert mirrored_caption("a red circle above a blue square") == ("vertical", "a red circle below a blue square")
    assert mirrored_caption("a red circle") is None
    images = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    caps = ["a red circle above a blue square", "a red circle"]
    x, c = with_mirrored_pairs(images, caps)
    assert c == caps + ["a red circle below a blue square"]
    assert torch.equal(x[:2], images) and torch.equal(x[2], images[0].flip(1))  # upside down
    x, c = with_mirrored_pairs(images, caps, limit=0)
    assert c == caps and torch.equal(x, images)


def test_training_batch_is_what_the_config_says():
    """The batch the reranker asset (and bench/reranker.py) trains on: mirrored pairs
    appended, K negatives per caption (mirrored ones included), every caption encoded
    with BPE dropout, the same batch for the same rng."""
    caps = ["a small red circle to the left of a large blue square", "a green triangle above a red circle"] * 2
    tok = train_bpe_tokenizer(caps * 50, get_profile("tiny").text)
    images = torch.rand(4, 3, 8, 8)
    cfg = TINY.replace(hard_negatives=2, mirrored_pairs=3, binding_negatives=1.0)
    x, text, negs = training_batch(images, caps, tok, cfg, random.Random(0))
    assert x.shape[0] == text.shape[0] == negs.shape[0] == 4 + 3 and negs.shape[1] == 2
    again = training_batch(images, caps, tok, cfg, random.Random(0))
    assert all(torch.equal(a, b) for a, b in zip((x, text, negs), again))
    # no negatives, no mirrors: the plain in-batch batch
    x0, text0 = training_batch(images, caps, tok, TINY.replace(hard_negatives=0), random.Random(0))
    assert torch.equal(x0, images) and text0.shape[0] == 4
    with pytest.raises(ValueError, match="mirrored_pairs"):
        TINY.replace(mirrored_pairs=-1)
