"""Classifier-free guidance (not the paper's; a demo-profile lever): the prior
trains with a share of empty captions (`PriorTrainingConfig.caption_dropout`),
and the sampler draws from ``uncond + s * (cond - uncond)`` of the logits under
the caption and under the empty caption (`guidance_scale`).

What a user depends on: the guided draw is exactly that formula (checked
against an independent greedy decode through the plain forward pass); cached
and uncached decoding, and any chunking, give the same tokens; s = 1 is the
paper's plain draw and s = 0 the unconditional one; the dropped captions are
the same on every rank and after a resume, at the asked rate, and a run
without dropout is batched (and digested) as before."""

from __future__ import annotations

import pytest
import torch

from dalle_core.prior import DalleTransformer
from dalle_core.prior.config import PriorTrainingConfig
from dalle_core.prior.data import caption_dropped, code_batches, code_shards, empty_captions, write_synthetic_code_shards
from dalle_core.prior.sampling import sample_image_codes
from dalle_core.profiles import get_profile
from dalle_core.storage import LocalStorage

torch.set_num_threads(1)

TINY = get_profile("tiny").prior.replace(init_std=0.08)  # sharp enough logits for the draws to differ


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DalleTransformer(TINY).eval()


def captions(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY.text_vocab_size, (B, TINY.text_len), generator=g)


def test_the_empty_caption_is_every_positions_pad_token():
    e = empty_captions(3, TINY.text_len, TINY.text_vocab_size)
    assert e.shape == (3, TINY.text_len)
    assert e[1].tolist() == [TINY.text_vocab_size + i for i in range(TINY.text_len)]


@torch.no_grad()
def test_guided_greedy_decode_is_the_guidance_formula(model):
    text, s = captions(), 3.0
    got = sample_image_codes(model, text, top_k=1, guidance_scale=s)
    # independent reference: the full forward pass under both captions at every step
    empty = empty_captions(2, TINY.text_len, TINY.text_vocab_size)
    codes = torch.zeros(2, TINY.image_len, dtype=torch.long)
    for j in range(TINY.image_len):
        cond, uncond = model(text, codes)[1][:, j], model(empty, codes)[1][:, j]
        codes[:, j] = (uncond + s * (cond - uncond)).argmax(-1)
    assert torch.equal(got, codes)
    # and it is not the plain greedy decode (the guidance changes what is drawn)
    assert not torch.equal(got, sample_image_codes(model, text, top_k=1))


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.7, top_k=20)], ids=["plain", "filtered"])
def test_guided_draws_agree_cached_uncached_and_in_any_chunks(model, kw):
    text = captions(B=3, seed=1)
    cached = sample_image_codes(model, text, 2, seed=4, guidance_scale=2.0, **kw)
    assert torch.equal(cached, sample_image_codes(model, text, 2, seed=4, guidance_scale=2.0, use_cache=False, **kw))
    assert torch.equal(cached, sample_image_codes(model, text, 2, seed=4, guidance_scale=2.0, batch_size=3, **kw))


def test_scale_one_is_the_plain_draw_and_zero_the_unconditional_one(model):
    text = captions(B=2, seed=2)
    plain = sample_image_codes(model, text, 2, seed=5)
    assert torch.equal(plain, sample_image_codes(model, text, 2, seed=5, guidance_scale=1.0))
    unconditional = sample_image_codes(model, empty_captions(2, TINY.text_len, TINY.text_vocab_size), 2, seed=5)
    assert torch.equal(unconditional, sample_image_codes(model, text, 2, seed=5, guidance_scale=0.0))


@pytest.mark.parametrize("bad", [-1.0, float("inf"), "2", True])
def test_a_bad_guidance_scale_is_refused_by_name(model, bad):
    with pytest.raises(ValueError, match="guidance_scale must be"):
        sample_image_codes(model, captions(), guidance_scale=bad)


# --- caption dropout in the prior's batches -----------------------------------------------------

@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("codes")
    write_synthetic_code_shards(LocalStorage(root), "image_codes", TINY, n_shards=2, per_shard=40, seed=1)
    return code_shards(LocalStorage(root), "image_codes")


def batches(shards, n, **kw):
    paths, counts = shards
    it = code_batches(paths, 8, seed=3, counts=counts, text_vocab_size=TINY.text_vocab_size, **kw)
    return [next(it) for _ in range(n)]


def test_caption_dropout_empties_that_share_of_captions_and_keeps_the_images(shards):
    plain = batches(shards, 40)
    dropped = batches(shards, 40, caption_dropout=0.25)
    empty = empty_captions(1, TINY.text_len, TINY.text_vocab_size)[0]
    n = total = 0
    for (t0, i0), (t1, i1) in zip(plain, dropped):
        assert torch.equal(i0, i1)  # the same samples, images untouched
        for a, b in zip(t0, t1):
            total += 1
            if torch.equal(b, empty):
                n += 1
            else:
                assert torch.equal(a, b)  # a kept caption is the stored one
    assert 0.17 < n / total < 0.33, n / total  # 320 draws at p = 0.25: +-0.024 a standard error
    # rate 0 is the batching of before, exactly
    for (t0, i0), (t1, i1) in zip(plain, batches(shards, 40, caption_dropout=0.0)):
        assert torch.equal(t0, t1) and torch.equal(i0, i1)


def test_dropped_captions_are_the_same_after_a_resume_and_on_every_rank(shards):
    paths, counts = shards
    full = batches(shards, 12, caption_dropout=0.5)
    resumed = code_batches(paths, 8, seed=3, start_step=7, counts=counts, caption_dropout=0.5,
                           text_vocab_size=TINY.text_vocab_size)
    for step in range(7, 12):
        t, i = next(resumed)
        assert torch.equal(t, full[step][0]) and torch.equal(i, full[step][1])
    # two ranks, the "sample" split: rank r holds the global batch's positions r, r + 2, ...
    ranks = [code_batches(paths, 8, seed=3, rank=r, world_size=2, counts=counts, caption_dropout=0.5,
                          text_vocab_size=TINY.text_vocab_size) for r in range(2)]
    for step in range(12):
        parts = [next(r)[0] for r in ranks]
        assert torch.equal(torch.stack([parts[p % 2][p // 2] for p in range(8)]), full[step][0])
    assert caption_dropped(3, 5, 2, 0.5) == caption_dropped(3, 5, 2, 0.5)
    assert not caption_dropped(3, 5, 2, 0.0)


def test_caption_dropout_is_checked_and_left_out_of_digests_while_off(shards):
    paths, counts = shards
    with pytest.raises(ValueError, match="caption_dropout must be in"):
        next(code_batches(paths, 8, seed=0, counts=counts, caption_dropout=1.0, text_vocab_size=10))
    with pytest.raises(ValueError, match="needs text_vocab_size"):
        next(code_batches(paths, 8, seed=0, counts=counts, caption_dropout=0.1))
    with pytest.raises(ValueError, match="caption_dropout must be in"):
        PriorTrainingConfig(caption_dropout=-0.1)
    assert "caption_dropout" not in PriorTrainingConfig().to_dict()  # earlier runs' digests stay
    assert PriorTrainingConfig(caption_dropout=0.1).to_dict()["caption_dropout"] == 0.1
    assert PriorTrainingConfig.from_dict(PriorTrainingConfig(caption_dropout=0.1).to_dict()).caption_dropout == 0.1


def test_a_profile_cannot_guide_a_prior_that_never_saw_an_empty_caption():
    from dataclasses import replace

    from dalle_core.profiles import ProfileError

    tiny = get_profile("tiny")
    with pytest.raises(ProfileError, match="guidance_scale = 2.0 needs a prior trained with empty captions"):
        replace(tiny, sampling=tiny.sampling.replace(guidance_scale=2.0))
    guided = replace(tiny, prior_training=tiny.prior_training.replace(caption_dropout=0.1),
                     sampling=tiny.sampling.replace(guidance_scale=2.0))
    assert guided.sampling.key() == {"guidance_scale": 2.0}  # part of every evaluation fingerprint
    for name in ("paper-1.3B", "paper-12B", "small"):  # the paper's sampling, and the laptop demo's
        p = get_profile(name)
        assert (p.sampling.guidance_scale, p.prior_training.caption_dropout) == (1.0, 0.0), name


def test_a_prior_file_trained_without_caption_dropout_is_not_guided(shards, tmp_path):
    """The trainer records its caption dropout in the prior file; `load_prior` keeps it, and the
    sampler (hence `TextToImage.generate`, the samples and zero-shot assets, `dalle generate`)
    refuses to guide a prior that never learnt the empty caption, naming the cause."""
    from dalle_core.prior.model import load_prior, read_prior_file, save_prior
    from dalle_core.prior.sampling import guidance_refusal
    from dalle_core.prior.train import train_prior

    paths, counts = shards
    text = captions()
    for rate in (0.0, 0.25):
        training = PriorTrainingConfig(batch_size=8, total_steps=2, warmup_steps=1, log_every=1,
                                       checkpoint_every=10**9, amp_dtype="fp32", caption_dropout=rate)

        def fn(start, rate=rate):
            return code_batches(paths, 8, seed=3, start_step=start, counts=counts, caption_dropout=rate,
                                text_vocab_size=TINY.text_vocab_size)

        r = train_prior(TINY, training, fn, tmp_path / f"p{rate}", precision="fp32", resume=False)
        prior = load_prior(r.model_path).eval()
        assert prior.training_meta["caption_dropout"] == rate
        plain = sample_image_codes(prior, text, seed=0)  # the plain draw is always allowed
        assert plain.shape == (2, TINY.image_len)
        if rate == 0.0:
            with pytest.raises(ValueError, match=r"guidance_scale=2 needs a prior trained with caption dropout.*"
                                                 r"records caption_dropout=0"):
                sample_image_codes(prior, text, seed=0, guidance_scale=2.0)
        else:
            assert guidance_refusal(prior, 2.0) is None
            sample_image_codes(prior, text, seed=0, guidance_scale=2.0)
    # a file from before caption dropout existed records nothing: trained at 0, refused
    blob = read_prior_file(r.model_path)
    old = tmp_path / "old.pt"
    save_prior(old, DalleTransformer(TINY), TINY, meta={k: v for k, v in blob["meta"].items() if k != "caption_dropout"})
    assert "does not record caption dropout" in guidance_refusal(load_prior(old), 3.0)
    assert guidance_refusal(load_prior(old), 1.0) is None
    assert guidance_refusal(DalleTransformer(TINY), 2.0) is None  # built in memory: the caller's to know
