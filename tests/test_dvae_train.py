"""dVAE training loop: loss goes down, logs, checkpoints, kill-and-resume equality."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from dalle_core.dvae import build_dvae, elb_loss, load_dvae, map_pixels, train_dvae
from dalle_core.dvae.train import _list_checkpoints, checkpoint_name
from dalle_core.profiles import get_profile
from synthetic_images import make_batch

TINY = get_profile("tiny").dvae


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one intra-op thread is as fast as two on an idle
    machine and ~10x faster on a busy 2-core one (no thread-pool contention)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def batch_source(start_step: int):
    step = start_step
    while True:
        yield make_batch(step)
        step += 1


def params_of(result) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, m in [("enc.", result.raw_encoder), ("dec.", result.raw_decoder),
                      ("ema_enc.", result.encoder), ("ema_dec.", result.decoder)]:
        out.update({prefix + k: v for k, v in m.state_dict().items()})
    return out


@torch.no_grad()
def hard_recon(encoder, decoder, x: torch.Tensor) -> float:
    """Reconstruction NLL through the argmax codes (deterministic)."""
    logits = encoder(map_pixels(x))
    z = F.one_hot(logits.argmax(1), logits.shape[1]).permute(0, 3, 1, 2).float()
    return float(elb_loss(x, logits, decoder(z), 0.0)["recon"])


def test_training_lowers_the_loss_on_a_fixed_batch(tmp_path):
    cfg = TINY.replace(total_steps=40, log_every=5, checkpoint_every=100)
    fixed = make_batch(0)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        enc0, dec0 = build_dvae(cfg)  # the trainer's initial weights
    logs = []
    result = train_dvae(cfg, [fixed], tmp_path, on_log=lambda s, m: logs.append((s, m)))
    assert result.step == 40 and [s for s, _ in logs] == [5, 10, 15, 20, 25, 30, 35, 40]
    before = hard_recon(enc0, dec0, fixed)
    after = hard_recon(result.raw_encoder, result.raw_decoder, fixed)
    assert after < before - 0.2, (before, after)
    assert logs[-1][1]["recon"] < logs[0][1]["recon"]
    m = logs[-1][1]
    for key in ("total", "recon", "kl", "temperature", "beta", "lr", "usage", "perplexity", "grad_norm"):
        assert isinstance(m[key], float), key
    assert 0 < m["usage"] <= 1 and 1 <= m["perplexity"] <= cfg.vocab_size
    assert m["total"] == pytest.approx(m["recon"] + m["beta"] * m["kl"]
                                       + cfg.marginal_kl_weight * m.get("marginal_kl", 0.0), rel=1e-5, abs=1e-6)
    assert m["temperature"] == pytest.approx(cfg.temperature_end)  # schedules reached their ends
    assert m["beta"] == pytest.approx(cfg.kl_weight)
    # the exported model is the EMA, loadable on its own with the pinned config
    enc, dec, cfg2 = load_dvae(result.model_path)
    assert cfg2 == cfg
    x = make_batch(7)
    assert torch.equal(enc(map_pixels(x)), result.encoder(map_pixels(x)))


def test_kill_and_resume_gives_identical_parameters(tmp_path):
    cfg = TINY.replace(total_steps=10, log_every=1, checkpoint_every=3, keep_checkpoints=2)
    full = train_dvae(cfg, batch_source, tmp_path / "full")

    class Killed(Exception):
        pass

    def kill_at_7(step, metrics):
        if step == 7:
            raise Killed

    with pytest.raises(Killed):
        train_dvae(cfg, batch_source, tmp_path / "killed", on_log=kill_at_7)
    # checkpoints at 3 and 6 (kept: the newest 2), nothing half-written
    assert [s for s, _ in _list_checkpoints(tmp_path / "killed")] == [3, 6]
    assert not list((tmp_path / "killed").glob("*.tmp*"))

    resumed = train_dvae(cfg, batch_source, tmp_path / "killed")
    assert resumed.resumed_from == 6 and resumed.step == 10
    a, b = params_of(full), params_of(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = lambda h: [{k: v for k, v in m.items() if k != "sec_per_step"} for m in h]  # noqa: E731
    assert strip(full.history) == strip(resumed.history)

    # a finished run is loaded back, not retrained
    again = train_dvae(cfg, batch_source, tmp_path / "killed")
    assert again.step == 10 and again.resumed_from == 10
    assert all(torch.equal(v, params_of(again)[k]) for k, v in a.items())


def test_resume_with_a_reiterable_source_and_a_corrupt_newest_checkpoint(tmp_path):
    cfg = TINY.replace(total_steps=8, log_every=4, checkpoint_every=2, keep_checkpoints=3)
    data = [make_batch(i) for i in range(3)]  # cycled: 0 1 2 0 1 2 0 1
    full = train_dvae(cfg, data, tmp_path / "full")


    def kill_at_4(step, metrics):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_dvae(cfg, data, tmp_path / "run", on_log=kill_at_4)
    # the newest checkpoint is damaged (say, a disk problem): resume falls back to the one before
    newest = tmp_path / "run" / checkpoint_name(4)
    newest.write_bytes(newest.read_bytes()[:100])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = train_dvae(cfg, data, tmp_path / "run")
    assert any("unreadable" in str(w.message) for w in caught)
    assert resumed.resumed_from == 2
    a, b = params_of(full), params_of(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_different_model_shape(tmp_path):
    cfg = TINY.replace(total_steps=2, checkpoint_every=1)
    train_dvae(cfg, batch_source, tmp_path)
    with pytest.raises(ValueError, match="vocab_size: checkpoint 64 vs config 128"):
        train_dvae(cfg.replace(vocab_size=128, total_steps=4), batch_source, tmp_path)
    # resume=False starts over and replaces the old step checkpoints
    r = train_dvae(cfg.replace(vocab_size=128), batch_source, tmp_path, resume=False)
    assert r.resumed_from is None and r.config.vocab_size == 128


@pytest.mark.parametrize("bad, match", [
    (torch.rand(8, 1, 32, 32), "grayscale"),
    (torch.rand(8, 3, 64, 64), "expected 32x32 images, got 64x64"),
    ((torch.rand(8, 3, 32, 32) * 255).to(torch.uint8), "uint8"),
    (torch.rand(8, 3, 32, 32) * 255, "divide by 255"),
])
def test_bad_batches_are_named(tmp_path, bad, match):
    cfg = TINY.replace(total_steps=3)

    def source(start):
        yield make_batch(0)
        yield bad

    with pytest.raises(ValueError, match=match) as err:
        train_dvae(cfg, source, tmp_path)
    assert "batch for step 1" in str(err.value)


def test_running_out_of_data_is_a_clear_error(tmp_path):
    cfg = TINY.replace(total_steps=5)
    with pytest.raises(ValueError, match="ran out at step 2"):
        train_dvae(cfg, lambda start: iter([make_batch(0), make_batch(1)]), tmp_path)
    gen = (make_batch(i) for i in range(2))  # a one-shot generator cannot be cycled
    with pytest.raises(ValueError, match="one-shot"):
        train_dvae(cfg, gen, tmp_path / "gen")


def test_kmeans_codebook_init_puts_every_code_on_a_feature_cluster(tmp_path):
    from dalle_core.dvae.codebook_init import encoder_features, kmeans_codebook_init

    torch.manual_seed(0)
    encoder, _ = build_dvae(TINY)
    images = torch.cat([make_batch(s) for s in range(32)])  # 256 images -> 16k positions
    stats = kmeans_codebook_init(encoder, images, logit_std=5.0, seed=0)
    assert stats["codes_in_use"] >= 0.9 * TINY.vocab_size
    # the argmax of the new logits is the nearest centroid: recover the centroids
    # from the layer (w = s c, b = -s |c|^2 / 2) and compare with a brute-force search
    conv = encoder.blocks.output.conv
    w, b = conv.w.detach().flatten(1), conv.b.detach()
    s = (w * w).sum(1) / (-2 * b)  # = s for every code
    assert torch.allclose(s, s[0].expand_as(s), rtol=1e-4)
    c = w / s[0]
    x = encoder_features(encoder, images[:16])
    nearest = torch.cdist(x.double(), c.double()).argmin(1)
    codes = encoder(map_pixels(images[:16])).argmax(1).flatten()
    assert (codes == nearest).float().mean() > 0.999
    # logits spread as asked (per position, over codes)
    logits = encoder(map_pixels(images[:16]))
    assert 3.5 < float(logits.std(dim=1).mean()) < 7.0


def test_kmeans_init_run_resumes_to_the_same_parameters(tmp_path):
    cfg = TINY.replace(total_steps=8, log_every=1, checkpoint_every=4, codebook_init="kmeans",
                       codebook_init_images=64)
    full = train_dvae(cfg, batch_source, tmp_path / "full")
    assert full.codebook_init is not None and full.codebook_init["codes_in_use"] > 16

    class Killed(Exception):
        pass

    def kill_at_6(step, metrics):
        if step == 6:
            raise Killed

    with pytest.raises(Killed):
        train_dvae(cfg, batch_source, tmp_path / "k", on_log=kill_at_6)
    resumed = train_dvae(cfg, batch_source, tmp_path / "k")
    assert resumed.resumed_from == 4 and resumed.codebook_init is None  # not redone on resume
    a, b = params_of(full), params_of(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="codebook_init must be"):
        TINY.replace(codebook_init="magic")


@pytest.mark.slow
def test_small_dvae_reconstructions_keep_what_the_captions_say(tmp_path):
    """The issue's bar, on the demo world at the `small` profile: train the small
    preset on the world's training images (what the crawl keeps) and decode the
    held-out evaluation images through their codes; the world's own checker must
    still recognise colours, shapes and places in at least 95% of them."""
    import os

    from dalle_core.data.image_decode import load_rgb, resize_center_crop
    from dalle_core.demo.checker import check_image
    from dalle_core.data.loader import image_to_tensor
    from dalle_core.dvae.evaluate import evaluate_reconstructions
    from dalle_core.profiles import get_profile
    from assets.resources import demo_world_for

    cfg = get_profile("small").dvae
    world = demo_world_for(get_profile("small"))
    train = torch.stack([image_to_tensor(resize_center_crop(load_rgb(it.image_bytes()), cfg.image_size), cfg.image_size)
                         for it in world.all_items() if it.expected == "keep"])
    held_out = world.eval_items()
    images = [resize_center_crop(it.image(), cfg.image_size) for it in held_out]

    def batches(start_step: int):
        g = torch.Generator().manual_seed(0)
        for step in range(cfg.total_steps):
            idx = torch.randint(len(train), (cfg.batch_size,), generator=g)
            if step >= start_step:
                yield train[idx]

    torch.set_num_threads(min(2, os.cpu_count() or 1))  # the module's fixture restores it
    result = train_dvae(cfg, batches, tmp_path)
    report = evaluate_reconstructions(result.encoder, result.decoder, images, [it.caption for it in held_out],
                                      check=lambda im, c: check_image(im, c).match)
    assert len(images) >= 200 and report.caption_match_original == 1.0
    assert report.caption_match_reconstruction >= 0.95, report.metrics()
    assert report.codebook_usage > 0.05, report.metrics()  # no collapse onto a few codes
