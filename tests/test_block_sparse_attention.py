"""Block-sparse attention (PriorConfig.attention = "block", dalle_core.prior.block_sparse)
computes what SDPA computes under the same boolean mask: the layout keeps exactly the
allowed (query, key) pairs, outputs and gradients agree (float64, atol 1e-10) for row,
column and conv layers at sizes where the blocks do not divide the stream, the prior's
logits, gradients and training losses agree, and the bf16 path stays close."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dalle_core.prior import DalleTransformer, PriorConfig
from dalle_core.prior import block_sparse
from dalle_core.prior.masks import build_attention_mask

from attention_pair import sdpa_and

KINDS = ["row", "column", "conv", "dense"]
# (text_len, grid): S = 32 (blocks of 10: padded), 13, 150, and the demo's 288
SIZES = [(7, 5), (4, 3), (6, 12), (32, 16)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: f"S{s[0] + s[1] ** 2}")
def test_layout_keeps_exactly_the_mask(kind, sizes):
    """Scattering each block's mask back over the stream gives the dense mask, every
    position is queried once, and the padding keys are masked."""
    L, g = sizes
    mask = build_attention_mask(kind, L, g, "cpu", kernel=3 if g < 12 else 7)
    lay = block_sparse.layout_from_mask(mask, block_sparse.query_order(kind, L, g), block=2 * g)
    S = mask.shape[0]
    rebuilt = torch.zeros(S, S, dtype=torch.bool)
    n_blocks, n_keys = lay.key_index.shape
    q = lay.query_index.view(n_blocks, lay.block)
    for b in range(n_blocks):
        qi, ki = lay.mask[b].nonzero(as_tuple=True)  # padding keys repeat position 0: scatter only the kept
        rebuilt[q[b][qi], lay.key_index[b][ki]] = True
    assert torch.equal(rebuilt, mask)
    assert torch.equal(lay.query_index[lay.inverse], torch.arange(S))
    if (L, g) == (32, 16) and kind != "dense":  # the demo's size: at most ~2/5 of the dense scores (tiny streams pad more)
        assert lay.kept < 0.41


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: f"S{s[0] + s[1] ** 2}")
def test_outputs_and_gradients_equal_sdpa(kind, sizes):
    L, g = sizes
    kernel = 3 if g < 12 else 7
    mask = build_attention_mask(kind, L, g, "cpu", kernel=kernel)
    lay = block_sparse.layer_layout(kind, L, g, "cpu", kernel=kernel)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, mask.shape[0], 8, dtype=torch.float64, generator=gen).requires_grad_()
               for _ in range(3))
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    sparse = block_sparse.block_sparse_attention(q, k, v, lay)
    torch.testing.assert_close(sparse, dense, atol=1e-10, rtol=1e-10)
    w = torch.randn(dense.shape, dtype=torch.float64, generator=gen)
    for a, b in zip(torch.autograd.grad((dense * w).sum(), (q, k, v)), torch.autograd.grad((sparse * w).sum(), (q, k, v))):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: f"S{s[0] + s[1] ** 2}")
def test_the_reorders_are_skipped_or_gathered_where_they_can_be(sizes):
    """Row and conv layers block the queries in stream order when the blocks divide the
    stream (the demo's 288: no reorder at all); column layers permute them (the backward
    a gather); a padded layout is neither (the backward sums rows). Each path's gradients
    are the ones compared with SDPA's above."""
    L, g = sizes
    S = L + g * g
    divides = S % (2 * g) == 0
    for kind in ("row", "conv", "column"):
        lay = block_sparse.layer_layout(kind, L, g, "cpu", kernel=3 if g < 12 else 7)
        assert lay.permutes == divides
        assert lay.in_order == (divides and kind != "column")
    if (L, g) == (32, 16):
        assert divides


def test_take_positions_matches_index_select_with_repeats_and_permutations():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 9, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    perm = torch.randperm(9, generator=gen)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(9)
    for index, inv in ((torch.tensor([0, 3, 3, 8, 1, 0, 0]), None), (perm, inverse)):
        w = torch.randn(2, 3, index.numel(), 4, dtype=torch.float64, generator=gen)
        ours = block_sparse.take_positions(x, index, inv)
        ref = x.index_select(2, index)
        assert torch.equal(ours, ref)
        (g_ours,) = torch.autograd.grad((ours * w).sum(), x)
        (g_ref,) = torch.autograd.grad((ref * w).sum(), x)
        torch.testing.assert_close(g_ours, g_ref, atol=1e-12, rtol=0)


def _pair(cfg: PriorConfig) -> tuple[DalleTransformer, DalleTransformer]:
    return sdpa_and(cfg, "block")


def _cfg(**kw) -> PriorConfig:
    """The paper's pattern over 4 layers (row, column, row, conv) at S = 6 + 64."""
    base = dict(n_layer=4, n_head=2, d_head=8, text_vocab_size=13, text_len=6, image_vocab_size=11,
                image_grid=8, conv_kernel=5)
    base.update(kw)
    return PriorConfig(**base)


def _batch(cfg: PriorConfig, B: int = 3):
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, cfg.text_embedding_size, (B, cfg.text_len), generator=g),
            torch.randint(0, cfg.image_vocab_size, (B, cfg.image_len), generator=g))


def test_prior_logits_and_gradients_equal_sdpa():
    sdpa, blk = _pair(_cfg())
    text, image = _batch(sdpa.config)
    la, lb = sdpa.loss(text, image)["total"], blk.loss(text, image)["total"]
    torch.testing.assert_close(lb, la, atol=1e-6, rtol=1e-6)
    la.backward()
    lb.backward()
    for (name, pa), pb in zip(sdpa.named_parameters(), blk.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_block_is_the_path_taken_and_sampling_keeps_sdpa(monkeypatch):
    """Training runs block_sparse_attention in every layer; the sampler's prefixes
    (prefill, one-row decode steps) are not whole streams and get no block layout (the
    prefill runs SDPA, a decode step dalle_core.prior.decode_attention)."""
    _, blk = _pair(_cfg())
    calls = []
    real = block_sparse.block_sparse_attention
    monkeypatch.setattr(block_sparse, "block_sparse_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        blk(*_batch(blk.config))
    assert len(calls) == blk.config.n_layer
    layer = blk.blocks[0].attn
    cpu = torch.device("cpu")
    assert layer.block_mask(cpu, 0, blk.config.text_len + 1) is None
    assert layer.block_mask(cpu, blk.config.seq_len - 1, 1) is None


def test_bf16_autocast_stays_close_to_fp32():
    """Under CPU bf16 autocast the scores and probabilities are bf16 (as in SDPA's bf16
    path): the loss stays within bf16 rounding of the fp32 loss."""
    sdpa, blk = _pair(_cfg())
    text, image = _batch(sdpa.config)
    with torch.no_grad():
        ref = sdpa.loss(text, image)["total"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = blk.loss(text, image)["total"]
    assert abs(float(low) - float(ref)) < 0.02 * float(ref)


def test_training_losses_equal_sdpa(tmp_path):
    """Ten AdamW updates with either path give the same losses (fp32)."""
    from dalle_core.prior.config import PriorTrainingConfig
    from dalle_core.prior.train import train_prior

    cfg = _cfg()
    training = PriorTrainingConfig(batch_size=4, total_steps=10, warmup_steps=2, lr=3e-3, log_every=1,
                                   checkpoint_every=10**9, amp_dtype="fp32")

    def batches(start: int):
        g = torch.Generator().manual_seed(start)
        while True:
            yield (torch.randint(0, cfg.text_embedding_size, (4, cfg.text_len), generator=g),
                   torch.randint(0, cfg.image_vocab_size, (4, cfg.image_len), generator=g))

    losses = {}
    for how in ("sdpa", "block"):
        torch.manual_seed(0)
        r = train_prior(cfg.replace(attention=how), training, batches, tmp_path / how, device="cpu",
                        precision="fp32", resume=False)
        losses[how] = [h["loss"] for h in r.history if h.get("event") == "log"]
    assert len(losses["sdpa"]) == 10
    torch.testing.assert_close(torch.tensor(losses["block"]), torch.tensor(losses["sdpa"]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["small", "medium"])
def test_the_demo_profiles_train_with_block_sparse_attention_on_the_cpu(name):
    """What the prior asset hands the trainer (the profile as JSON, --profile-json) keeps
    attention "auto", and the model built from it computes every layer block-sparse on
    the CPU (the demo's path; masked SDPA only with attention "sdpa")."""
    from dalle_core.profiles import Profile, get_profile

    cfg = Profile.from_dict(get_profile(name).to_dict()).prior
    assert cfg.attention == "auto"
    model = DalleTransformer(cfg)
    cpu = torch.device("cpu")
    assert all(isinstance(b.attn.block_mask(cpu, 0, cfg.seq_len), block_sparse.BlockSparseLayout) for b in model.blocks)
