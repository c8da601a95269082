"""The contrastive reranker: shapes and invariances, the symmetric InfoNCE loss,
reranking, input errors, save / load with the config pinned, training that
resumes to the same result, and that it learns the demo world's colours."""

import math
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

def test_features_scores_and_invariances():
    model = make()
    images, ids = random_batch(MICRO, b=5)
    feats = model.image_features(images)
    assert feats.shape == (5, MICRO.embed_dim)
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
    pad = ids >= MICRO.text_vocab_size
    shuffled[pad] = MICRO.text_vocab_size + (MICRO.text_len - 1)
    torch.testing.assert_close(model.text_features(shuffled), model.text_features(ids))
    # but the words and their order do
    swapped = ids.clone()
    swapped[:, [0, 1]] = swapped[:, [1, 0]]
    real2 = (~pad[:, :2]).all(1) & (ids[:, 0] != ids[:, 1])
    assert not torch.allclose(model.text_features(swapped)[real2], model.text_features(ids)[real2])
    # other image sizes are resized to the config's
    big = F.interpolate(images, size=(2 * MICRO.image_size,) * 2, mode="nearest")
    assert model.image_features(big).shape == (5, MICRO.embed_dim)


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
