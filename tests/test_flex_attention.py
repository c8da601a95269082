"""FlexAttention (PriorConfig.attention = "flex", dalle_core.prior.flex) computes what SDPA
computes: the prior's logits and gradients agree for every layer kind (row, column, conv,
with the caption), at sequence lengths that are not a multiple of flex's 128-tiles; the
config field round-trips and old config dicts load as "sdpa".

On the CPU flex runs eager here (DALLE_FLEX_COMPILE=0: compiling costs ~20 s a shape) and
torch refuses its backward (unfused, so torch gates it); the gradient tests lift that gate
to run flex's own backward with our BlockMask. The fused CUDA kernels are checked by the
test marked for CUDA, skipped here."""

from __future__ import annotations

import pytest
import torch

from dalle_core.prior import DalleTransformer, PriorConfig
from dalle_core.prior import block_sparse, flex
from dalle_core.prior.config import SHAPE_FIELDS

from attention_pair import sdpa_and

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.fixture(autouse=True)
def _eager_flex(monkeypatch):
    monkeypatch.setenv("DALLE_FLEX_COMPILE", "0")


def tiny(kind: str, **kw) -> PriorConfig:
    """Two layers of one kind; S = text_len + grid^2 = 7 + 25 = 32 (or as given)."""
    base = dict(n_layer=2, n_head=2, d_head=8, text_vocab_size=13, text_len=7, image_vocab_size=11,
                image_grid=5, conv_kernel=3, attention_kinds=(kind, kind))
    base.update(kw)
    return PriorConfig(**base)


def batch(cfg: PriorConfig, B: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, cfg.text_embedding_size, (B, cfg.text_len), generator=g),
            torch.randint(0, cfg.image_vocab_size, (B, cfg.image_len), generator=g))


def pair(cfg: PriorConfig) -> tuple[DalleTransformer, DalleTransformer]:
    return sdpa_and(cfg, "flex")


KINDS = ["row", "column", "conv", "dense"]
# (text_len, grid): S = 32, 13 (odd), 150 (past one 128-tile, padded to 256)
SIZES = [(7, 5), (4, 3), (6, 12)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: f"S{s[0] + s[1] ** 2}")
def test_flex_forward_equals_sdpa(kind, sizes):
    L, g = sizes
    cfg = tiny(kind, text_len=L, image_grid=g)
    sdpa, f = pair(cfg)
    text, image = batch(cfg)
    with torch.no_grad():
        a, b = sdpa(text, image), f(text, image)
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)


def test_flex_is_the_path_taken(monkeypatch):
    """The flex model really runs flex_attention on the full stream (and SDPA does not)."""
    cfg = tiny("row")
    _, f = pair(cfg)
    calls = []
    real = flex.flex_attention
    monkeypatch.setattr(flex, "flex_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        f(*batch(cfg))
    assert len(calls) == cfg.n_layer
    assert flex.block_mask("row", 7, 5, 32, "cpu", kernel=3) is flex.block_mask("row", 7, 5, 32, "cpu", kernel=3)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("sizes", SIZES[:2], ids=lambda s: f"S{s[0] + s[1] ** 2}")
def test_flex_gradients_equal_sdpa(kind, sizes, monkeypatch):
    from torch.nn.attention import flex_attention as fa

    monkeypatch.setattr(fa, "_validate_device", lambda q, k, v: None)  # run flex's eager backward on the CPU
    L, g = sizes
    cfg = tiny(kind, text_len=L, image_grid=g)
    sdpa, f = pair(cfg)
    text, image = batch(cfg)
    la, lb = sdpa.loss(text, image)["total"], f.loss(text, image)["total"]
    torch.testing.assert_close(lb, la, atol=1e-5, rtol=1e-5)
    la.backward()
    lb.backward()
    for (name, p), q in zip(sdpa.named_parameters(), f.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_cpu_training_with_flex_says_what_to_do():
    cfg = tiny("conv")
    _, f = pair(cfg)
    with pytest.raises(NotImplementedError, match="attention='sdpa' or 'auto'"):
        f.loss(*batch(cfg))["total"].backward()


def test_auto_is_block_sparse_on_cpu_and_flex_on_cuda():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert flex.resolve_attention("auto", cpu) == "block"
    assert flex.resolve_attention("auto", cuda) == "flex"
    assert flex.resolve_attention("auto", cuda, dropout=0.1) == "sdpa"  # flex has no dropout
    assert flex.resolve_attention("sdpa", cuda) == "sdpa" and flex.resolve_attention("flex", cpu) == "flex"
    cfg = tiny("row", attention="auto")
    assert isinstance(DalleTransformer(cfg).blocks[0].attn.block_mask(cpu, 0, cfg.seq_len),
                      block_sparse.BlockSparseLayout)
    cfg = tiny("row", attention="sdpa")
    assert DalleTransformer(cfg).blocks[0].attn.block_mask(cpu, 0, cfg.seq_len) is None


def test_partial_streams_keep_sdpa():
    """Sampling's prefill and decode steps (start > 0 or a prefix) never build a BlockMask."""
    cfg = tiny("row", attention="flex")
    block = DalleTransformer(cfg).blocks[0].attn
    cpu = torch.device("cpu")
    assert block.block_mask(cpu, 0, cfg.seq_len) is not None
    assert block.block_mask(cpu, 0, cfg.text_len + 1) is None
    assert block.block_mask(cpu, cfg.seq_len - 1, 1) is None


def test_config_field_roundtrips_and_old_dicts_load_as_sdpa():
    cfg = tiny("row")
    assert cfg.attention == "sdpa"
    assert "attention" not in cfg.to_dict()  # the default is implied: old digests unchanged
    for choice in ("flex", "block", "auto"):
        c = cfg.replace(attention=choice)
        assert c.to_dict()["attention"] == choice and PriorConfig.from_dict(c.to_dict()) == c
    old = {k: v for k, v in cfg.to_dict().items() if k != "attention"}
    assert PriorConfig.from_dict(old).attention == "sdpa"
    assert PriorConfig.from_dict({k: old[k] for k in SHAPE_FIELDS}).attention == "sdpa"
    with pytest.raises(ValueError, match="attention must be one of"):
        cfg.replace(attention="dense")
    with pytest.raises(ValueError, match="no attention dropout"):
        cfg.replace(attention="flex", dropout=0.1)
    cfg.replace(attention="auto", dropout=0.1)  # auto falls back to SDPA


def test_tiles_kept_at_paper_size():
    """What flex skips of the 10 x 10 tiles of 128 at 1280 positions (row/conv: most of the
    lower triangle too; column in raster order: only the upper triangle)."""
    kept = {k: flex.tiles_kept(k, 256, 32) for k in KINDS}
    assert kept["row"] < 0.5 and kept["conv"] < 0.5
    assert 0.5 <= kept["column"] <= 0.6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused flex kernels need CUDA")
def test_compiled_flex_on_cuda_matches_sdpa(monkeypatch):
    monkeypatch.setenv("DALLE_FLEX_COMPILE", "1")
    for kind in KINDS:
        cfg = tiny(kind, text_len=6, image_grid=12)
        sdpa, f = (m.cuda() for m in pair(cfg))
        text, image = (t.cuda() for t in batch(cfg))
        la, lb = sdpa.loss(text, image)["total"], f.loss(text, image)["total"]
        la.backward()
        lb.backward()
        torch.testing.assert_close(lb, la, atol=1e-4, rtol=1e-4)
        for p, q in zip(sdpa.parameters(), f.parameters()):
            torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-3)
