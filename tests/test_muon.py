"""Muon on the prior's resblock matrices, AdamW on the rest (dalle_core/muon.py; the
laptop profiles' optimizer, not the paper's): what goes where, what one step does, the
rate ratio, resume, and the refusals."""

from __future__ import annotations

import pytest
import torch

from dalle_core.prior.config import PriorTrainingConfig
from dalle_core.prior.init import materialize_prior
from dalle_core.prior.data import code_batches, code_shards, write_synthetic_code_shards
from dalle_core.prior.model import DalleTransformer, build_optimizer
from dalle_core.muon import LR_RATIO, MuonWithAdamW
from dalle_core.prior.model import hidden_matrices
from dalle_core.prior.train import train_prior
from dalle_core.profiles import get_profile
from dalle_core.storage import LocalStorage

TINY = get_profile("tiny").prior
MUON = get_profile("tiny").prior_training.replace(optimizer="muon", muon_lr_ratio=2.0)


@pytest.fixture(scope="module")
def codes(tmp_path_factory):
    root = tmp_path_factory.mktemp("codes")
    storage = LocalStorage(root)
    write_synthetic_code_shards(storage, "image_codes", TINY, n_shards=2, per_shard=24, seed=1)
    return code_shards(storage, "image_codes")


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def batches(codes, batch=8):
    paths, counts = codes
    return lambda start: code_batches(paths, batch, 0, start_step=start, counts=counts)


def test_muon_takes_the_resblock_matrices_and_adamw_the_rest():
    torch.manual_seed(0)
    model = DalleTransformer(TINY)
    opt = build_optimizer(model, MUON)
    assert isinstance(opt, MuonWithAdamW)
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    on_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    on_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert on_muon == {n for n, _ in hidden_matrices(model)}
    assert on_muon and all(".qkv." in n or ".proj." in n or ".fc." in n for n in on_muon)
    # embeddings, heads, gains and biases stay on AdamW, each parameter on exactly one optimizer
    assert {"text_embedding.weight", "image_embedding.weight", "text_head.weight", "image_head.weight",
            "ln_f.weight", "bos"} <= on_adamw
    assert on_muon.isdisjoint(on_adamw) and on_muon | on_adamw == set(names.values())
    # the heads keep the paper's weight decay, embeddings and gains none; Muon's matrices decay too
    decay = {names[id(p)]: g["weight_decay"] for g in adamw.param_groups for p in g["params"]}
    assert decay["image_head.weight"] == MUON.weight_decay and decay["image_embedding.weight"] == 0.0
    assert muon.param_groups[0]["weight_decay"] == MUON.weight_decay
    assert muon.param_groups[0][LR_RATIO] == 2.0 and all(LR_RATIO not in g for g in adamw.param_groups)
    # the paper's optimizer is untouched
    assert isinstance(build_optimizer(model, MUON.replace(optimizer="adamw")), torch.optim.AdamW)


def test_one_step_orthogonalises_the_matrices_and_is_plain_adamw_elsewhere():
    """Against independent references: a Muon matrix moves by a (near) semi-orthogonal
    matrix of the stated size; every other parameter moves exactly as a plain AdamW
    on it alone would move it."""
    torch.manual_seed(0)
    model = DalleTransformer(TINY)
    ref = DalleTransformer(TINY)
    ref.load_state_dict(model.state_dict())
    cfg = MUON.replace(weight_decay=0.0, muon_lr_ratio=1.0, lr=1e-3)
    opt = build_optimizer(model, cfg)
    mats = {n for n, _ in hidden_matrices(model)}
    ref_opt = torch.optim.AdamW([p for n, p in ref.named_parameters() if n not in mats], lr=cfg.lr,
                                betas=cfg.betas, eps=cfg.eps, weight_decay=0.0)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    text = torch.randint(0, TINY.text_vocab_size, (16, TINY.text_len))
    image = torch.randint(0, TINY.image_vocab_size, (16, TINY.image_len))
    for m, o in ((model, opt), (ref, ref_opt)):
        m.loss(text, image)["total"].backward()
        o.step()
    ref_after = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        if n in mats:
            delta = (start[n] - p).detach().double()
            rows, cols = delta.shape
            # Moonlight's scale: lr x 0.2 x sqrt(max(rows, cols)) per unit singular value
            s = torch.linalg.svdvals(delta) / (cfg.lr * 0.2 * max(rows, cols) ** 0.5)
            # Newton-Schulz (5 quintic steps, in bf16) pulls the singular values towards 1
            # (~0.7-1.2; directions the gradient nearly lacks stay small): an orthogonalised
            # update, where the raw gradient's spread over one to two orders of magnitude
            assert 0.7 < s.median() < 1.1 and s.max() < 1.3, (n, s.median(), s.max())
            g_s = torch.linalg.svdvals(ref_after[n].grad.double())
            spread = lambda v: (v.quantile(0.9) / v.quantile(0.1)).item()  # noqa: E731
            assert spread(s) < 3.5 < 10 < spread(g_s), (n, spread(s), spread(g_s))
        else:
            assert torch.equal(p, ref_after[n]), n


def test_the_matrices_move_lr_ratio_times_as_fast(codes, tmp_path):
    """The trainer sets each group's rate from the schedule x its lr_ratio: with the same
    gradients, doubling the ratio doubles every matrix's first step and leaves the rest."""
    steps = {}
    for ratio in (1.0, 2.0):
        r = train_prior(TINY, MUON.replace(muon_lr_ratio=ratio), batches(codes), tmp_path / str(ratio),
                        total_steps=1, save_final=False, seed=0)
        steps[ratio] = r.model
    with torch.device("meta"):
        start = DalleTransformer(TINY)
    materialize_prior(start, "cpu", 0, TINY)  # what train_prior starts from (seed 0)
    s0 = dict(start.named_parameters())
    one, two = dict(steps[1.0].named_parameters()), dict(steps[2.0].named_parameters())
    mats = {n for n, _ in hidden_matrices(start)}
    for n in s0:
        d1, d2 = (one[n] - s0[n]).detach(), (two[n] - s0[n]).detach()
        if n in mats:
            assert d1.abs().max() > 0 and torch.allclose(d2, 2 * d1, rtol=1e-4, atol=1e-7), n
        else:
            assert torch.equal(d1, d2), n


def test_resumed_muon_run_equals_an_uninterrupted_one(codes, tmp_path):
    fn = batches(codes)
    full = train_prior(TINY, MUON, fn, tmp_path / "full", total_steps=12, checkpoint_every=6)
    part = train_prior(TINY, MUON, fn, tmp_path / "resumed", total_steps=12, checkpoint_every=6, stop_after=5)
    assert part.steps == 5
    rest = train_prior(TINY, MUON, fn, tmp_path / "resumed", total_steps=12, checkpoint_every=6)
    assert rest.resumed_from == 5 and rest.losses == full.losses[5:]
    for (k, a), (_, b) in zip(full.model.state_dict().items(), rest.model.state_dict().items()):
        assert torch.equal(a, b), k
    # the loss falls (12 updates, 10 of them warm-up)
    assert sum(full.losses[-3:]) / 3 < full.losses[0] - 0.2, full.losses


def test_resume_refuses_a_checkpoint_of_the_other_optimizer(codes, tmp_path):
    train_prior(TINY, MUON.replace(optimizer="adamw"), batches(codes), tmp_path, total_steps=2, save_final=False)
    with pytest.raises(ValueError, match="optimizer 'adamw'.*asks for 'muon'"):
        train_prior(TINY, MUON, batches(codes), tmp_path, total_steps=4)


def test_config_names_the_optimizer_only_when_it_is_not_the_papers():
    paper = PriorTrainingConfig()
    assert paper.optimizer == "adamw" and "optimizer" not in paper.to_dict()
    assert "muon_lr_ratio" not in paper.to_dict()  # digests of earlier runs unchanged
    d = MUON.to_dict()
    assert d["optimizer"] == "muon" and d["muon_lr_ratio"] == 2.0
    assert PriorTrainingConfig.from_dict(d) == MUON
    with pytest.raises(ValueError, match="optimizer must be 'adamw'"):
        PriorTrainingConfig(optimizer="sgd")
    with pytest.raises(ValueError, match="muon_lr_ratio"):
        PriorTrainingConfig(optimizer="muon", muon_lr_ratio=0.0)
    for name in ("paper-1.3B", "paper-12B"):
        assert get_profile(name).prior_training.optimizer == "adamw"


# --- the reranker (RerankerConfig.optimizer) ------------------------------------------------------

# a micro reranker for the mechanics (as tests/test_rerank.py's)
MICRO = get_profile("tiny").reranker.replace(image_stem=8, image_widths=(8, 16), text_width=16, text_layers=1,
                                             text_heads=2, embed_dim=16, batch_size=8, warmup_steps=2)


def _reranker_batches(cfg, n=12):
    g = torch.Generator().manual_seed(0)
    data = [(torch.rand(cfg.batch_size, 3, cfg.image_size, cfg.image_size, generator=g),
             torch.randint(0, cfg.text_vocab_size, (cfg.batch_size, cfg.text_len), generator=g)) for _ in range(n)]
    return lambda start: iter(data[start:])


def test_reranker_muon_takes_the_linears_resumes_and_refuses_the_other_optimizer(tmp_path):
    from dalle_core.rerank.model import ContrastiveReranker, RerankerConfig
    from dalle_core.rerank.train import build_optimizer as build_reranker_optimizer
    from dalle_core.rerank.train import train_reranker

    cfg = MICRO.replace(optimizer="muon", muon_lr_ratio=2.0)
    model = ContrastiveReranker(cfg)
    opt = build_reranker_optimizer(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    on_muon = {names[id(p)] for g in opt.optimizers[0].param_groups for p in g["params"]}
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert on_muon == linears and "image_encoder.proj.weight" in on_muon
    assert not any("token" in n or "position" in n or "stem" in n for n in on_muon)  # embeddings, convs: AdamW
    assert opt.optimizers[0].param_groups[0][LR_RATIO] == 2.0
    # the config names the optimizer only when it is not AdamW (earlier digests unchanged)
    assert "optimizer" not in MICRO.to_dict() and RerankerConfig.from_dict(cfg.to_dict()) == cfg

    fn = _reranker_batches(cfg)
    straight = train_reranker(cfg, fn, tmp_path / "a", total_steps=6)
    train_reranker(cfg, fn, tmp_path / "b", total_steps=6, stop_after=3)
    resumed = train_reranker(cfg, fn, tmp_path / "b", total_steps=6)
    assert resumed.resumed_from == 3 and resumed.losses == straight.losses[3:]
    for (k, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    train_reranker(MICRO, fn, tmp_path / "c", total_steps=6, stop_after=3)  # AdamW
    with pytest.raises(ValueError, match="optimizer 'adamw', this run asks for 'muon'"):
        train_reranker(cfg, fn, tmp_path / "c", total_steps=6)
