"""The prior's data pipeline and single-process training loop (CPU, tiny profile)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dalle_core.distributed.checkpoint import latest_step, list_checkpoints, load_latest, save_checkpoint
from dalle_core.distributed.parallelize import apply_activation_checkpointing
from dalle_core.precision.grad_scaling import PerResblockGradScaler, apply_per_resblock_grad_scaling
from dalle_core.profiles import get_profile
from dalle_core.prior.data import code_batches, code_shards, write_synthetic_code_shards
from dalle_core.prior.model import DalleTransformer, build_optimizer, load_prior, read_prior_file
from dalle_core.prior.train import LRSchedule, main, train_prior
from dalle_core.storage import LocalStorage

TINY = get_profile("tiny").prior
TRAINING = get_profile("tiny").prior_training


@pytest.fixture(scope="module")
def codes(tmp_path_factory):
    root = tmp_path_factory.mktemp("codes")
    storage = LocalStorage(root)
    write_synthetic_code_shards(storage, "image_codes", TINY, n_shards=4, per_shard=30, seed=1)
    paths, counts = code_shards(storage, "image_codes")
    return root, paths, counts


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the dev machine has 2 shared cores; 1 thread is faster for tiny
    yield
    torch.set_num_threads(n)


def rows(batch):
    text, image = batch
    return sorted(tuple(t.tolist()) + tuple(i.tolist()) for t, i in zip(text, image))


# --- data ------------------------------------------------------------------------------------

def test_code_batches_shapes_order_and_resume(codes):
    _, paths, counts = codes
    it = code_batches(paths, 8, seed=3, counts=counts)
    first = [next(it) for _ in range(20)]  # 120 samples / 8 = 15 batches an epoch: crosses into epoch 1
    text, image = first[0]
    assert text.dtype == torch.long and image.dtype == torch.long
    assert text.shape == (8, TINY.text_len) and image.shape == (8, TINY.image_len)
    # deterministic in (seed, epoch)
    again = list(zip(range(20), code_batches(paths, 8, seed=3, counts=counts)))
    assert all(torch.equal(a[0], b[1][0]) and torch.equal(a[1], b[1][1]) for a, b in zip(first, again))
    # start_step=k yields batch k first, also across the epoch boundary
    for k in (1, 7, 15, 17):
        b = next(code_batches(paths, 8, seed=3, start_step=k, counts=counts))
        assert torch.equal(b[0], first[k][0]) and torch.equal(b[1], first[k][1])
    # an epoch is a permutation of the data (ids are tokens 3-4), reshuffled in the next epoch
    epoch0 = [tuple(r[3:5]) for b in first[:15] for r in b[0].tolist()]
    assert len(set(epoch0)) == 120
    epoch1 = [tuple(r[3:5]) for b in first[15:] for r in b[0].tolist()]
    assert epoch1 != epoch0[:len(epoch1)]
    # another seed, another order
    other = next(code_batches(paths, 8, seed=4, counts=counts))
    assert not torch.equal(other[0], first[0][0])
    # counts read from the tars when not given
    b = next(code_batches(paths, 8, seed=3, start_step=2))
    assert torch.equal(b[0], first[2][0])


@pytest.mark.parametrize("world", [2, 4])
def test_code_batches_rank_slices_partition_the_global_batch(codes, world):
    _, paths, counts = codes
    single = code_batches(paths, 8, seed=5, counts=counts)
    ranks = [code_batches(paths, 8, seed=5, start_step=0, rank=r, world_size=world, counts=counts)
             for r in range(world)]
    for _ in range(17):
        whole = next(single)
        parts = [next(it) for it in ranks]
        assert all(p[0].shape[0] == 8 // world for p in parts)
        cat = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        assert rows(cat) == rows(whole)
    # resumed ranks agree with the uninterrupted ones
    b = next(code_batches(paths, 8, seed=5, start_step=16, rank=1, world_size=world, counts=counts))
    again = code_batches(paths, 8, seed=5, rank=1, world_size=world, counts=counts)
    for _ in range(16):
        next(again)
    assert torch.equal(b[0], next(again)[0])


def test_code_batches_shard_split_is_disjoint(codes):
    _, paths, counts = codes
    ids = []
    for r in range(2):
        it = code_batches(paths, 4, seed=0, rank=r, world_size=2, split="shard", shuffle_buffer=10,
                          counts=counts)
        # epoch 0: each rank gets 2 shards of 30 samples: 30 // 2 = 15 batches
        ids.append({tuple(row[3:5]) for _ in range(15) for row in next(it)[0].tolist()})
    assert len(ids[0]) == 30 and len(ids[1]) == 30
    assert not ids[0] & ids[1]


def test_code_batches_errors(codes):
    _, paths, counts = codes
    with pytest.raises(ValueError, match="multiple of the world size"):
        next(code_batches(paths, 6, seed=0, rank=0, world_size=4, counts=counts))
    with pytest.raises(ValueError, match="fewer than one batch"):
        next(code_batches(paths[:1], 64, seed=0, counts=counts[:1]))
    with pytest.raises(ValueError, match="no image-code shards"):
        next(code_batches([], 8, seed=0))


# --- learning rate -------------------------------------------------------------------------------

def test_lr_schedule_warmup_then_halving_on_plateau():
    s = LRSchedule(1e-3, warmup_steps=10, factor=0.5, max_decays=2, window=5, threshold=0.01)
    assert s.lr_at(0) == pytest.approx(1e-4) and s.lr_at(9) == pytest.approx(1e-3)
    assert s.lr_at(50) == pytest.approx(1e-3)
    for step in range(11, 16):  # first window after warm-up sets the best
        s.observe(step, 2.0)
    assert s.decays == 0
    for step in range(16, 21):  # no 1% improvement: halve
        s.observe(step, 1.99)
    assert s.decays == 1 and s.lr_at(30) == pytest.approx(5e-4)
    for step in range(21, 26):  # improvement: keep
        s.observe(step, 1.5)
    assert s.decays == 1
    for step in range(26, 41):  # plateau again, but at most max_decays
        s.observe(step, 1.5)
    assert s.decays == 2
    s2 = LRSchedule(1e-3, 10, window=5)
    s2.load_state_dict(s.state_dict())
    assert s2.lr_at(100) == pytest.approx(1e-3 * 0.5**2) == s.lr_at(100)


# --- training ----------------------------------------------------------------------------------

def batches_fn_for(paths, counts, batch=8, seed=0):
    return lambda start: code_batches(paths, batch, seed, start_step=start, counts=counts)


def test_train_prior_loss_falls_and_resume_matches_uninterrupted(codes, tmp_path):
    _, paths, counts = codes
    fn = batches_fn_for(paths, counts)
    logs: list[dict] = []
    full = train_prior(TINY, TRAINING, fn, tmp_path / "full", on_log=logs.append, total_steps=30, log_every=5,
                       checkpoint_every=10)
    assert full.steps == 30 and len(full.losses) == 30
    # the loss falls: the mean of the last 5 updates well below the first
    assert sum(full.losses[-5:]) / 5 < full.losses[0] - 0.5, full.losses
    events = [r["event"] for r in logs]
    assert events[0] == "start" and events[-1] == "end" and events.count("checkpoint") == 3
    rec = [r for r in logs if r["event"] == "log"][-1]
    for key in ("loss", "loss_text", "loss_image", "lr", "grad_norm", "tokens_per_s"):
        assert key in rec
    assert [s for s, _ in list_checkpoints(tmp_path / "full")] == [10, 20, 30]

    # interrupted after 13 updates (checkpoint written at the stop), then resumed
    part = train_prior(TINY, TRAINING, fn, tmp_path / "resumed", total_steps=30, log_every=5, checkpoint_every=10,
                       stop_after=13)
    assert part.steps == 13 and latest_step(tmp_path / "resumed") == 13 and part.model_path is None
    rest = train_prior(TINY, TRAINING, fn, tmp_path / "resumed", total_steps=30, log_every=5, checkpoint_every=10)
    assert rest.resumed_from == 13 and rest.start_step == 13 and len(rest.losses) == 17
    assert rest.losses == full.losses[13:]
    for (k, a), (_, b) in zip(full.model.state_dict().items(), rest.model.state_dict().items()):
        assert torch.equal(a, b), k
    for k in full.ema:
        assert torch.equal(full.ema[k], rest.ema[k]), k

    # nothing left to do: a third call returns at once with the same result
    again = train_prior(TINY, TRAINING, fn, tmp_path / "resumed", total_steps=30)
    assert again.losses == [] and again.steps == 30


def test_save_load_prior_pins_the_config(codes, tmp_path):
    _, paths, counts = codes
    res = train_prior(TINY, TRAINING, batches_fn_for(paths, counts), tmp_path, total_steps=3, log_every=1)
    blob = read_prior_file(res.model_path)
    assert blob["config"]["n_layer"] == TINY.n_layer and blob["meta"]["steps"] == 3
    raw = load_prior(res.model_path, use_ema=False)
    ema = load_prior(res.model_path)
    assert raw.config == TINY
    for k, v in res.model.state_dict().items():
        assert torch.equal(raw.state_dict()[k], v)
    assert any(not torch.equal(ema.state_dict()[k], v) for k, v in res.model.state_dict().items())
    # the file loads with its own shape even when the caller's defaults are different
    text, image = next(code_batches(paths, 2, 0, counts=counts))
    with torch.no_grad():
        assert torch.allclose(raw.loss(text, image)["total"], res.model.loss(text, image)["total"])


def test_resume_refuses_another_shape(codes, tmp_path):
    _, paths, counts = codes
    train_prior(TINY, TRAINING, batches_fn_for(paths, counts), tmp_path, total_steps=2, save_final=False)
    for other in (TINY.replace(n_layer=2), TINY.replace(n_head=2)):
        with pytest.raises(ValueError, match="another model shape"):
            train_prior(other, TRAINING, batches_fn_for(paths, counts), tmp_path, total_steps=4)


def test_bf16_and_fp16_per_resblock_paths_run(codes, tmp_path):
    _, paths, counts = codes
    logs: list[dict] = []
    r = train_prior(TINY, TRAINING, batches_fn_for(paths, counts, batch=4), tmp_path / "fp16", on_log=logs.append,
                    precision="fp16-per-resblock", total_steps=2, log_every=1, save_final=False)
    assert r.precision == "fp16-per-resblock" and all(torch.isfinite(torch.tensor(r.losses)))
    rec = [x for x in logs if x["event"] == "log"][-1]
    assert rec["grad_scale_min"] > 2**13  # initialised at M * 2^13, grown after clean steps
    # the scaler's state is in the checkpoint
    meta = json.loads((Path(r.checkpoint) / "meta.json").read_text())
    assert meta["meta"]["scaler"]["step_count"] == 2
    r = train_prior(TINY, TRAINING, batches_fn_for(paths, counts, batch=4), tmp_path / "bf16", precision="bf16",
                    total_steps=2, save_final=False)
    assert all(torch.isfinite(torch.tensor(r.losses)))


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = DalleTransformer(TINY)
    b = DalleTransformer(TINY)
    b.load_state_dict(a.state_dict())
    apply_activation_checkpointing(b)
    assert list(a.state_dict()) == list(b.state_dict())  # names unchanged
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, TINY.text_embedding_size, (2, TINY.text_len), generator=g)
    image = torch.randint(0, TINY.image_vocab_size, (2, TINY.image_len), generator=g)
    a.loss(text, image)["total"].backward()
    b.loss(text, image)["total"].backward()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-7), n


# --- checkpoints ----------------------------------------------------------------------------------------

def test_checkpoints_are_atomic_and_load_across_wrappers(tmp_path):
    torch.manual_seed(0)
    src = DalleTransformer(TINY)
    scaler = PerResblockGradScaler(list(src.resblocks()))
    apply_per_resblock_grad_scaling(src, scaler)
    opt = build_optimizer(src, TRAINING)
    text = torch.randint(0, TINY.text_embedding_size, (2, TINY.text_len))
    image = torch.randint(0, TINY.image_vocab_size, (2, TINY.image_len))
    src.loss(text, image)["total"].backward()
    opt.step()
    save_checkpoint(tmp_path, 5, src, opt, {"meta": {"note": "five"}, "rank": {"x": torch.arange(3)}})
    # debris a crash leaves behind: a half-written newer checkpoint and one without meta.json
    (tmp_path / "step-00000009.tmp").mkdir()
    (tmp_path / "step-00000008").mkdir()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5]

    dst = DalleTransformer(TINY)  # no scaling wrappers: other parameter paths
    opt2 = build_optimizer(dst, TRAINING)
    extra: dict = {}
    assert load_latest(tmp_path, dst, opt2, extra) == 5
    assert extra["meta"] == {"note": "five"} and torch.equal(extra["rank"]["x"], torch.arange(3))
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    s1 = opt.state_dict()["state"]
    s2 = opt2.state_dict()["state"]
    assert all(torch.equal(s1[i]["exp_avg"], s2[i]["exp_avg"]) for i in s1)
    assert load_latest(tmp_path / "nothing", dst, opt2) is None

    # keep: only the newest checkpoints stay; stale .tmp directories are removed
    for step in (6, 7, 10):
        save_checkpoint(tmp_path, step, dst, opt2, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [7, 10]
    assert not (tmp_path / "step-00000009.tmp").exists()


# --- command line ------------------------------------------------------------------------------------------

def test_main_single_process(codes, tmp_path):
    root, _, _ = codes
    rc = main(["--profile", "tiny", "--codes", str(root / "image_codes"), "--out", str(tmp_path),
               "--steps", "4", "--log-every", "2", "--quiet"])
    assert rc == 0
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["event"] == "start" and recs[-1]["event"] == "end"
    assert (tmp_path / "prior.pt").is_file() and latest_step(tmp_path) == 4
    # the storage root (holding image_codes/) works too
    rc = main(["--profile", "tiny", "--codes", str(root), "--out", str(tmp_path / "b"), "--steps", "1", "--quiet"])
    assert rc == 0
