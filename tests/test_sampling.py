"""Sampling image tokens from the prior: KV-cached decoding gives exactly the
tokens of full recomputation, seeding, top-k / top-p, greedy decoding, image
prompts, and the input errors."""

import pytest
import torch

from dalle_core.prior import DalleTransformer
from dalle_core.prior.sampling import (
    StaticKVCache,
    filter_logits,
    prompt_rows,
    sample_from_logits,
    sample_image_codes,
)
from dalle_core.profiles import get_profile

torch.set_num_threads(1)

# Sharper than the default init (0.02 gives almost uniform logits) so that the
# top-k / top-p filters and the causal structure actually matter.
TINY = get_profile("tiny").prior.replace(init_std=0.08)


def make_model(dtype=torch.float32, seed=0, cfg=TINY):
    torch.manual_seed(seed)
    return DalleTransformer(cfg).to(dtype).eval()


def captions(B=2, seed=0, cfg=TINY):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.text_embedding_size, (B, cfg.text_len), generator=g)


@pytest.fixture(scope="module")
def model64():
    return make_model(torch.float64)


@pytest.fixture(scope="module")
def model32():
    return make_model(torch.float32)


@torch.no_grad()
def teacher_forced_logits(model, text, codes):
    """Image logits [B, N, V] of the full forward for given codes (position j
    depends on codes < j only)."""
    return model(text, codes)[1]


# --- cached == uncached -------------------------------------------------------------------------

FILTERS = [dict(), dict(top_k=5), dict(top_p=0.8), dict(temperature=0.7, top_k=20, top_p=0.9)]


@pytest.mark.parametrize("kw", FILTERS, ids=["plain", "top_k", "top_p", "all"])
def test_cached_equals_uncached_float64(model64, kw):
    text = captions(B=2)
    for seed in range(3):
        cached = sample_image_codes(model64, text, n_per_caption=2, seed=seed, use_cache=True, **kw)
        full = sample_image_codes(model64, text, n_per_caption=2, seed=seed, use_cache=False, **kw)
        assert cached.shape == (4, TINY.image_len) and cached.dtype == torch.long
        assert torch.equal(cached, full), f"seed {seed} {kw}"


@pytest.mark.parametrize("kw", [dict(), dict(top_k=8, top_p=0.9)], ids=["plain", "filtered"])
def test_cached_equals_uncached_float32(model32, kw):
    # fp32 differences between the two paths are ~1e-6 on the logits; with the
    # same uniforms a token could only flip at a CDF boundary (not for these seeds)
    text = captions(B=2, seed=1)
    for seed in range(2):
        cached = sample_image_codes(model32, text, n_per_caption=2, seed=seed, **kw)
        full = sample_image_codes(model32, text, n_per_caption=2, seed=seed, use_cache=False, **kw)
        assert torch.equal(cached, full)


def test_cached_decoding_respects_the_masks_of_a_non_square_stream():
    # a micro model with every attention kind on a 4x4 grid, non-wrapping conv
    cfg = TINY.replace(n_layer=3, image_grid=4, conv_kernel=3, conv_wraparound=False,
                       attention_kinds=("column", "row", "conv"))
    model = make_model(torch.float64, cfg=cfg)
    text = captions(B=3, cfg=cfg)
    a = sample_image_codes(model, text, seed=5, top_k=4)
    b = sample_image_codes(model, text, seed=5, top_k=4, use_cache=False)
    assert torch.equal(a, b)


# --- seeding ---------------------------------------------------------------------------------------

def test_seeding_is_deterministic_and_independent_of_batch_size(model32):
    text = captions(B=3)
    a = sample_image_codes(model32, text, n_per_caption=2, seed=7, top_p=0.95)
    b = sample_image_codes(model32, text, n_per_caption=2, seed=7, top_p=0.95)
    c = sample_image_codes(model32, text, n_per_caption=2, seed=7, top_p=0.95, batch_size=4)
    d = sample_image_codes(model32, text, n_per_caption=2, seed=8, top_p=0.95)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, d)
    # candidates of one caption differ from each other
    assert not torch.equal(a[0], a[1])
    # the global RNG is neither used nor disturbed
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    sample_image_codes(model32, text[:1], seed=7)
    assert torch.equal(torch.rand(1), before)


def test_the_draws_of_a_caption_share_its_prefill(model64, sampler_caches):
    # a caption is run once for its draws and its block read once for them (share_rows);
    # the tokens are those of every draw run on its own, however the rows are chunked
    from dalle_core.prior import sampling

    caches = sampler_caches
    text = captions(B=3, seed=2)
    alone = sample_image_codes(model64, text.repeat_interleave(4, 0), seed=4, top_k=6)
    assert all(c.shared_prefix(0) is None for c in caches)
    # 9: two whole captions, then one; 3: a chunk of 2 (a divisor of the 4 draws), not 3
    for batch_size, groups in [(None, [4]), (9, [4, 4]), (2, [2] * 6), (3, [2] * 6)]:
        caches.clear()
        shared = sample_image_codes(model64, text, n_per_caption=4, seed=4, top_k=6, batch_size=batch_size)
        assert torch.equal(shared, alone), batch_size
        for cache, g in zip(caches, groups):
            prefix_k, _ = cache.shared_prefix(0)
            assert prefix_k.shape[0] * g == cache.k[0].shape[0] and prefix_k.shape[2] == TINY.text_len + 1
    with pytest.raises(ValueError, match="groups of 2"):
        sampling._sample_chunk(model64, text[:2], None, torch.rand(2, TINY.image_len, dtype=torch.float64),
                               1.0, None, None, True, lambda: None, group=2)


def test_rows_are_caption_major(model32):
    text = captions(B=2)
    both = sample_image_codes(model32, torch.stack([text[0], text[0], text[1]]), n_per_caption=1, seed=3)
    rep = sample_image_codes(model32, text, n_per_caption=3, seed=3)
    assert rep.shape == (6, TINY.image_len)
    # the sampled tokens depend on the caption: rows of caption 0 were drawn under text[0]
    logits = teacher_forced_logits(model32, text.repeat_interleave(3, 0), rep)
    logits_other = teacher_forced_logits(model32, text.flip(0).repeat_interleave(3, 0), rep)
    lp = torch.log_softmax(logits, -1).gather(-1, rep.unsqueeze(-1)).sum()
    lp_other = torch.log_softmax(logits_other, -1).gather(-1, rep.unsqueeze(-1)).sum()
    assert lp > lp_other
    assert both.shape == (3, TINY.image_len)


# --- filters ---------------------------------------------------------------------------------------

def test_top_k_one_is_greedy_argmax(model32):
    text = captions(B=2, seed=2)
    got = sample_image_codes(model32, text, top_k=1, seed=0)
    # independent greedy reference through the plain forward pass
    codes = torch.zeros(2, TINY.image_len, dtype=torch.long)
    for j in range(TINY.image_len):
        codes[:, j] = teacher_forced_logits(model32, text, codes)[:, j].argmax(-1)
    assert torch.equal(got, codes)
    # greedy is independent of the seed and the temperature
    assert torch.equal(got, sample_image_codes(model32, text, top_k=1, seed=9, temperature=3.0))


def test_samples_stay_inside_the_top_k_and_the_nucleus(model32):
    text = captions(B=2, seed=4)
    k = 3
    codes = sample_image_codes(model32, text, n_per_caption=2, top_k=k, seed=1)
    logits = teacher_forced_logits(model32, text.repeat_interleave(2, 0), codes)
    topk = logits.topk(k, dim=-1).indices
    assert (topk == codes.unsqueeze(-1)).any(-1).all()

    p = 0.5
    codes = sample_image_codes(model32, text, n_per_caption=2, top_p=p, seed=1)
    logits = teacher_forced_logits(model32, text.repeat_interleave(2, 0), codes)
    probs = torch.softmax(logits.double(), -1)
    chosen = probs.gather(-1, codes.unsqueeze(-1)).squeeze(-1)
    more_likely = (probs * (probs > chosen.unsqueeze(-1))).sum(-1)
    assert (more_likely < p + 1e-6).all()


def test_filter_logits_exact():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]], dtype=torch.float64))
    inf = float("-inf")
    keep = lambda z: (z > inf).tolist()[0]  # noqa: E731
    assert keep(filter_logits(logits, top_k=2)) == [False, True, False, True]
    assert keep(filter_logits(logits, top_p=0.7)) == [False, True, False, True]
    assert keep(filter_logits(logits, top_p=0.79)) == [False, True, False, True]  # 0.5 + 0.3 >= 0.79
    assert keep(filter_logits(logits, top_p=0.81)) == [False, True, True, True]
    assert keep(filter_logits(logits, top_p=0.1)) == [False, True, False, False]  # most likely stays
    assert keep(filter_logits(logits, top_k=3, top_p=0.9)) == [False, True, True, True]
    assert keep(filter_logits(logits)) == [True] * 4


def test_inverse_cdf_sampling_follows_the_distribution():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3], dtype=torch.float64)
    n = 20000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tokens = sample_from_logits(probs.log().expand(n, 4), u)
    freq = torch.bincount(tokens, minlength=4).double() / n
    assert freq[1] == 0
    assert torch.allclose(freq, probs, atol=0.015)
    # the extremes of u land on tokens with mass
    edge = sample_from_logits(probs.log().expand(2, 4), torch.tensor([0.0, 1.0 - 2**-53], dtype=torch.float64))
    assert edge.tolist() == [0, 3]


# --- image prompts ----------------------------------------------------------------------------------

def test_prompt_rows_are_kept_and_the_rest_sampled(model64):
    text = captions(B=2, seed=3)
    g = TINY.image_grid
    images = torch.randint(0, TINY.image_vocab_size, (2, g, g), generator=torch.Generator().manual_seed(1))
    prompt = prompt_rows(images, rows=3)
    assert prompt.shape == (2, 3 * g)
    assert torch.equal(prompt_rows(images.reshape(2, -1), rows=3, grid=g), prompt)
    ticks = []
    out = sample_image_codes(model64, text, n_per_caption=2, prompt_codes=prompt, seed=0,
                             progress=lambda d, t: ticks.append((d, t)))
    r = 3 * g
    assert torch.equal(out[:, :r], prompt.repeat_interleave(2, 0))
    assert ticks[-1] == (TINY.image_len - r, TINY.image_len - r) and len(ticks) == TINY.image_len - r
    assert torch.equal(out, sample_image_codes(model64, text, n_per_caption=2, prompt_codes=prompt,
                                               seed=0, use_cache=False))
    # the prompt conditions what follows: greedy continuations of different prompts differ
    other = prompt_rows(images.flip(0), rows=3)
    a = sample_image_codes(model64, text, prompt_codes=prompt, top_k=1)
    b = sample_image_codes(model64, text, prompt_codes=other, top_k=1)
    assert not torch.equal(a[:, r:], b[:, r:])
    # a whole image as the prompt is returned as it is
    full = images.reshape(2, -1)
    assert torch.equal(sample_image_codes(model64, text, prompt_codes=full), full)


def test_progress_and_chunks(model32):
    text = captions(B=3)
    ticks = []
    sample_image_codes(model32, text, batch_size=2, progress=lambda d, t: ticks.append((d, t)))
    N = TINY.image_len
    assert ticks == [(i, 2 * N) for i in range(1, 2 * N + 1)]


def test_training_mode_is_restored_and_static_cache_guards_its_length():
    model = make_model()
    model.train()
    sample_image_codes(model, captions(B=1), seed=0)
    assert model.training
    cache = StaticKVCache(1, 3)
    k = torch.zeros(1, 1, 2, 4)
    cache.update(0, k, k)
    assert cache.length == 2
    with pytest.raises(RuntimeError, match="full"):
        cache.update(0, k, k)


# --- errors -----------------------------------------------------------------------------------------

def test_input_errors(model32):
    text = captions(B=2)
    L, N, g = TINY.text_len, TINY.image_len, TINY.image_grid
    cases = [
        (dict(text=text[:0]), "empty"),
        (dict(text=text[:, :-1]), f"exactly {L}"),
        (dict(text=text[0]), "shape"),
        (dict(text=text.float()), "integer"),
        (dict(text=text + TINY.text_embedding_size), "text ids"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(n_per_caption=0), "n_per_caption"),
        (dict(batch_size=0), "batch_size"),
        (dict(prompt_codes=torch.zeros(2, N + 1, dtype=torch.long)), "longer than the image"),
        (dict(prompt_codes=torch.zeros(3, g, dtype=torch.long)), "3 rows for 2 captions"),
        (dict(prompt_codes=torch.full((2, g), TINY.image_vocab_size)), "prompt codes"),
        (dict(prompt_codes=torch.zeros(2, g, g, dtype=torch.long)), r"\[B, r\]"),
    ]
    for kw, match in cases:
        args = dict(text=text)
        args.update(kw)
        with pytest.raises(ValueError, match=match):
            sample_image_codes(model32, **args)
    with pytest.raises(ValueError, match="rows"):
        prompt_rows(torch.zeros(1, g, g, dtype=torch.long), rows=g + 1)
