"""dVAE model, losses, schedules, config and the released-weights converter."""

from __future__ import annotations

import io
import math
import sys
import types

import pytest
import torch
import torch.nn as nn

from dalle_core.dvae import (
    Decoder,
    DVAEConfig,
    Encoder,
    build_dvae,
    convert_released_state_dict,
    cosine_schedule,
    decode_codes,
    elb_loss,
    encode_to_codes,
    gumbel_softmax_relaxation,
    kl_to_uniform,
    kl_weight_at,
    load_dvae,
    load_released_dvae,
    logit_laplace_nll,
    lr_at,
    map_pixels,
    save_dvae,
    temperature_at,
    unmap_pixels,
    validate_images,
)
from dalle_core.dvae import model as dvae_model
from dalle_core.dvae.convert import released_module_aliases
from dalle_core.profiles import get_profile, profile_names

TINY = get_profile("tiny").dvae


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one intra-op thread is as fast as two on an idle
    machine and ~10x faster on a busy 2-core one (no thread-pool contention)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

# -----------------------------------------------------------------------------
# The released layout (dall_e/encoder.py, decoder.py, utils.py)

# Representative names and shapes, worked out by hand from the dall_e source for
# Encoder(group_count=4, n_hid=256, n_blk_per_group=2, input_channels=3, vocab_size=8192)
# and Decoder(group_count=4, n_init=128, n_hid=256, n_blk_per_group=2, output_channels=3, vocab_size=8192).
RELEASED_ENCODER_KEYS = {
    "blocks.input.w": (256, 3, 7, 7),
    "blocks.input.b": (256,),
    "blocks.group_1.block_1.res_path.conv_1.w": (64, 256, 3, 3),
    "blocks.group_1.block_1.res_path.conv_2.w": (64, 64, 3, 3),
    "blocks.group_1.block_1.res_path.conv_3.w": (64, 64, 3, 3),
    "blocks.group_1.block_1.res_path.conv_4.w": (256, 64, 1, 1),
    "blocks.group_1.block_2.res_path.conv_4.b": (256,),
    "blocks.group_2.block_1.id_path.w": (512, 256, 1, 1),
    "blocks.group_2.block_1.id_path.b": (512,),
    "blocks.group_2.block_1.res_path.conv_1.w": (128, 256, 3, 3),
    "blocks.group_2.block_2.res_path.conv_1.w": (128, 512, 3, 3),
    "blocks.group_3.block_1.id_path.w": (1024, 512, 1, 1),
    "blocks.group_4.block_1.id_path.w": (2048, 1024, 1, 1),
    "blocks.group_4.block_2.res_path.conv_4.w": (2048, 512, 1, 1),
    "blocks.output.conv.w": (8192, 2048, 1, 1),
    "blocks.output.conv.b": (8192,),
}
RELEASED_DECODER_KEYS = {
    "blocks.input.w": (128, 8192, 1, 1),
    "blocks.input.b": (128,),
    "blocks.group_1.block_1.id_path.w": (2048, 128, 1, 1),
    "blocks.group_1.block_1.res_path.conv_1.w": (512, 128, 1, 1),
    "blocks.group_1.block_1.res_path.conv_2.w": (512, 512, 3, 3),
    "blocks.group_1.block_1.res_path.conv_4.w": (2048, 512, 3, 3),
    "blocks.group_1.block_2.res_path.conv_1.w": (512, 2048, 1, 1),
    "blocks.group_2.block_1.id_path.w": (1024, 2048, 1, 1),
    "blocks.group_3.block_1.id_path.w": (512, 1024, 1, 1),
    "blocks.group_4.block_1.id_path.w": (256, 512, 1, 1),
    "blocks.group_4.block_2.res_path.conv_4.w": (256, 64, 3, 3),
    "blocks.output.conv.w": (6, 256, 1, 1),
    "blocks.output.conv.b": (6,),
}


def _released_pair(device="meta"):
    return Encoder(device=device), Decoder(device=device)


def test_released_layout_names_and_shapes():
    enc, dec = _released_pair()
    esd, dsd = enc.state_dict(), dec.state_dict()
    for k, shape in RELEASED_ENCODER_KEYS.items():
        assert k in esd, k
        assert tuple(esd[k].shape) == shape, k
    for k, shape in RELEASED_DECODER_KEYS.items():
        assert k in dsd, k
        assert tuple(dsd[k].shape) == shape, k
    # 8 blocks x 4 convs x (w, b) + id_path where the width changes + input + output
    assert len(esd) == 8 * 8 + 3 * 2 + 2 + 2
    assert len(dsd) == 8 * 8 + 4 * 2 + 2 + 2
    # no projection where the width does not change
    assert "blocks.group_1.block_1.id_path.w" not in esd
    assert "blocks.group_2.block_2.id_path.w" not in esd
    assert isinstance(enc.blocks.group_1.block_1.id_path, nn.Identity)
    # only w and b
    assert {k.rsplit(".", 1)[1] for k in list(esd) + list(dsd)} == {"w", "b"}


def test_released_module_structure_and_attributes():
    enc, dec = _released_pair()
    assert list(enc.blocks._modules) == ["input", "group_1", "group_2", "group_3", "group_4", "output"]
    assert list(enc.blocks.group_1._modules) == ["block_1", "block_2", "pool"]
    assert list(enc.blocks.group_4._modules) == ["block_1", "block_2"]
    assert list(dec.blocks.group_1._modules) == ["block_1", "block_2", "upsample"]
    assert list(dec.blocks.group_4._modules) == ["block_1", "block_2"]
    assert isinstance(enc.blocks.group_1.pool, nn.MaxPool2d)
    assert dec.blocks.group_3.upsample.mode == "nearest"
    blk = enc.blocks.group_2.block_1
    assert list(blk.res_path._modules) == ["relu_1", "conv_1", "relu_2", "conv_2", "relu_3", "conv_3",
                                           "relu_4", "conv_4"]
    assert blk.post_gain == 1 / (4 * 2) ** 2 and blk.n_hid == 512 // 4
    assert list(enc.blocks.output._modules) == ["relu", "conv"]
    # kernel sizes: encoder blocks 3,3,3,1; decoder blocks 1,3,3,3
    assert [enc.blocks.group_1.block_1.res_path[i].kw for i in (1, 3, 5, 7)] == [3, 3, 3, 1]
    assert [dec.blocks.group_1.block_1.res_path[i].kw for i in (1, 3, 5, 7)] == [1, 3, 3, 3]
    # the fp32 layers of the release
    assert enc.blocks.output.conv.use_float16 is False and dec.blocks.input.use_float16 is False
    assert enc.blocks.input.use_float16 is True
    for m, attrs in [(enc, dict(group_count=4, n_hid=256, n_blk_per_group=2, input_channels=3, vocab_size=8192)),
                     (dec, dict(group_count=4, n_init=128, n_hid=256, n_blk_per_group=2, output_channels=3,
                                vocab_size=8192))]:
        for k, v in attrs.items():
            assert getattr(m, k) == v, k
        assert m.requires_grad is False and m.use_mixed_precision is True
    # the released default: frozen parameters
    assert not any(p.requires_grad for p in enc.parameters())


def test_group_count_is_configurable():
    enc, dec = build_dvae(TINY)
    assert TINY.grid_size == 8 and get_profile("small").dvae.grid_size == 16
    assert get_profile("paper-12B").dvae.grid_size == 32
    assert [k for k in enc.blocks._modules] == ["input", "group_1", "group_2", "group_3", "output"]
    x = torch.rand(2, 3, 32, 32)
    logits = enc(map_pixels(x))
    assert logits.shape == (2, TINY.vocab_size, 8, 8) and logits.dtype == torch.float32
    out = dec(torch.softmax(logits, 1))
    assert out.shape == (2, 6, 32, 32)


def test_state_dict_round_trip_gives_identical_outputs():
    torch.manual_seed(0)
    enc, dec = build_dvae(TINY)
    buf = io.BytesIO()
    torch.save({"e": enc.state_dict(), "d": dec.state_dict()}, buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    torch.manual_seed(1)
    enc2, dec2 = build_dvae(TINY)
    x = torch.rand(2, 3, 32, 32)
    assert not torch.equal(enc(map_pixels(x)), enc2(map_pixels(x)))
    enc2.load_state_dict(sd["e"])
    dec2.load_state_dict(sd["d"])
    assert torch.equal(enc(map_pixels(x)), enc2(map_pixels(x)))
    codes = encode_to_codes(enc, x)
    assert torch.equal(decode_codes(dec, codes), decode_codes(dec2, codes))


def test_save_load_dvae_pins_config(tmp_path):
    torch.manual_seed(0)
    enc, dec = build_dvae(TINY)
    path = save_dvae(tmp_path / "m.pt", enc, dec, TINY)
    enc2, dec2, cfg = load_dvae(path)
    assert cfg == TINY
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(encode_to_codes(enc, x), encode_to_codes(enc2, x))
    # a file written by an older/newer version: unknown keys ignored, training
    # fields missing -> defaults; the shape comes from the file, not the defaults
    obj = torch.load(path, weights_only=True)
    obj["config"] = {**TINY.shape_dict(), "some_future_field": 1}
    torch.save(obj, tmp_path / "old.pt")
    enc3, _, cfg3 = load_dvae(tmp_path / "old.pt")
    assert cfg3.shape_dict() == TINY.shape_dict() and cfg3.vocab_size != DVAEConfig().vocab_size
    assert torch.equal(encode_to_codes(enc, x), encode_to_codes(enc3, x))
    # a file whose weights do not match its config
    obj["config"] = {**TINY.shape_dict(), "vocab_size": 32}
    torch.save(obj, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="do not match"):
        load_dvae(tmp_path / "bad.pt")


# -----------------------------------------------------------------------------
# Pixels, tokens, input checks


def test_map_unmap_pixels_inverse():
    x = torch.rand(2, 3, 8, 8)
    m = map_pixels(x)
    assert float(m.min()) >= 0.1 - 1e-7 and float(m.max()) <= 0.9 + 1e-7
    assert torch.allclose(unmap_pixels(m), x, atol=1e-6)
    assert torch.equal(map_pixels(torch.zeros(1, 1, 1, 1)), torch.full((1, 1, 1, 1), 0.1))
    assert unmap_pixels(torch.full((1, 1, 1, 1), 0.95)).item() == 1.0  # clamped
    with pytest.raises(ValueError):
        map_pixels(torch.rand(3, 8, 8))
    with pytest.raises(ValueError):
        map_pixels(torch.rand(1, 3, 8, 8).double())


def test_encode_decode_shapes_and_dtypes():
    torch.manual_seed(0)
    enc, dec = build_dvae(TINY)
    x = torch.rand(4, 3, 32, 32)
    codes = encode_to_codes(enc, x)
    assert codes.dtype == torch.long and codes.shape == (4, 8, 8)
    assert int(codes.min()) >= 0 and int(codes.max()) < TINY.vocab_size
    # argmax of the logits: no noise, deterministic
    assert torch.equal(codes, enc(map_pixels(x)).argmax(1))
    assert torch.equal(codes, encode_to_codes(enc, x))
    y = decode_codes(dec, codes)
    assert y.dtype == torch.float32 and y.shape == (4, 3, 32, 32)
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


@pytest.mark.parametrize("bad, match", [
    (torch.rand(2, 1, 32, 32), "grayscale"),
    (torch.rand(2, 4, 32, 32), "channels"),
    (torch.rand(2, 32, 32, 3), "channels-last"),
    ((torch.rand(2, 3, 32, 32) * 255).to(torch.uint8), "uint8"),
    (torch.rand(2, 3, 32, 32).double(), "float32"),
    (torch.rand(2, 3, 32, 32) * 255, "divide by 255"),
    (torch.rand(2, 3, 32, 32) - 0.5, r"\[0, 1\]"),
    (torch.full((2, 3, 32, 32), float("nan")), r"\[0, 1\]"),
    (torch.rand(3, 32, 32), "4d"),
])
def test_bad_images_give_clear_errors(bad, match):
    enc, _ = build_dvae(TINY)
    with pytest.raises(ValueError, match=match):
        encode_to_codes(enc, bad)


def test_wrong_image_size_is_named():
    with pytest.raises(ValueError, match="expected 32x32 images, got 48x48"):
        validate_images(torch.rand(1, 3, 48, 48), image_size=32)
    enc, _ = build_dvae(TINY)
    with pytest.raises(ValueError, match="multiples of 4"):
        encode_to_codes(enc, torch.rand(1, 3, 30, 30))


def test_bad_codes_give_clear_errors():
    _, dec = build_dvae(TINY)
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        decode_codes(dec, torch.full((1, 8, 8), 64))
    with pytest.raises(ValueError, match="integer"):
        decode_codes(dec, torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="3d"):
        decode_codes(dec, torch.zeros(8, 8, dtype=torch.long))


def test_model_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of 4"):
        Encoder(n_hid=30, device="meta")
    with pytest.raises(ValueError, match="not divisible"):
        DVAEConfig(image_size=30, group_count=3)


# -----------------------------------------------------------------------------
# Losses


def test_logit_laplace_is_a_normalised_density():
    # integrate exp(-NLL) over (0, 1): the density of appendix A.3 integrates to 1
    x = torch.linspace(1e-7, 1 - 1e-7, 400_001, dtype=torch.float64)
    for mu, b in [(0.0, 1.0), (0.7, 0.3), (-1.5, 2.0)]:
        nll = logit_laplace_nll(x, torch.full_like(x, mu), torch.full_like(x, math.log(b)))
        total = torch.trapezoid(torch.exp(-nll.double()), x)
        assert abs(float(total) - 1.0) < 2e-3, (mu, b, float(total))
    # the NLL is smallest where logit(x) = mu
    xs = torch.tensor([0.2, 0.5, 0.8])
    nll = logit_laplace_nll(xs, torch.zeros(3), torch.full((3,), -2.0))
    assert int(nll.argmin()) == 1


def test_kl_to_uniform():
    k = 16
    assert torch.allclose(kl_to_uniform(torch.zeros(2, k, 3, 3)), torch.zeros(2, 3, 3), atol=1e-6)
    sharp = torch.full((1, k, 1, 1), -1e4)
    sharp[0, 5] = 0
    assert torch.allclose(kl_to_uniform(sharp), torch.full((1, 1, 1), math.log(k)), atol=1e-5)
    assert float(kl_to_uniform(torch.randn(4, k, 2, 2)).min()) >= 0


def test_gumbel_relaxation_becomes_one_hot_as_temperature_falls():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(256, 32, 1, 1, generator=g)
    maxp = []
    for tau in (1.0, 0.5, 1 / 16, 1 / 256):
        z = gumbel_softmax_relaxation(logits, tau, generator=torch.Generator().manual_seed(1))
        assert torch.allclose(z.sum(1), torch.ones(256, 1, 1), atol=1e-5)
        maxp.append(float(z.max(1).values.mean()))
    assert maxp == sorted(maxp) and maxp[-1] > 0.99 and maxp[0] < 0.9
    # same generator state -> same sample; the gradient reaches the logits
    lg = logits.clone().requires_grad_(True)
    z1 = gumbel_softmax_relaxation(lg, 0.5, generator=torch.Generator().manual_seed(3))
    z2 = gumbel_softmax_relaxation(lg, 0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(z1, z2)
    (z1 * torch.randn_like(z1)).sum().backward()
    assert lg.grad is not None and float(lg.grad.abs().sum()) > 0
    with pytest.raises(ValueError):
        gumbel_softmax_relaxation(logits, 0.0)


def test_gumbel_relaxation_is_a_gumbel_max_sample():
    """At a very low temperature the relaxed sample is the one-hot of
    argmax(logits + Gumbel noise): the codes drawn must follow softmax(logits)
    (the Gumbel-max trick), checked against the exact probabilities."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).view(1, 4, 1, 1).expand(40_000, 4, 1, 1)
    z = gumbel_softmax_relaxation(logits, 1e-3, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(z.argmax(1).flatten(), minlength=4).float() / 40_000
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.0, -1.0]), 0)
    assert torch.allclose(freq, expected, atol=0.01), (freq, expected)


def test_elb_loss_normalisation():
    torch.manual_seed(0)
    b, c, h, w, k = 2, 3, 8, 8, 16
    images = torch.rand(b, c, h, w)
    logits = torch.randn(b, k, 2, 2)
    out = torch.randn(b, 2 * c, h, w)
    d = elb_loss(images, logits, out, kl_weight=2.5)
    n_values = c * h * w  # the paper: 256 * 256 * 3
    nll = logit_laplace_nll(map_pixels(images), out[:, :c], out[:, c:])
    assert torch.allclose(d["recon"], nll.sum() / (b * n_values))
    assert torch.allclose(d["kl"], kl_to_uniform(logits).sum() / (b * n_values))
    assert torch.allclose(d["total"], d["recon"] + 2.5 * d["kl"])
    with pytest.raises(ValueError, match="decoder output shape"):
        elb_loss(images, logits, out[:, :3], 1.0)


# -----------------------------------------------------------------------------
# Schedules and config


def test_cosine_schedule_end_points():
    assert cosine_schedule(0, 1.0, 0.0, 100) == 1.0
    assert cosine_schedule(100, 1.0, 0.0, 100) == 0.0
    assert cosine_schedule(1000, 1.0, 0.0, 100) == 0.0  # held after
    assert cosine_schedule(50, 1.0, 0.0, 100) == pytest.approx(0.5)
    vals = [cosine_schedule(s, 0.0, 6.6, 10) for s in range(12)]
    assert vals == sorted(vals)
    paper = get_profile("paper-12B").dvae
    assert temperature_at(0, paper) == 1.0 and temperature_at(150_000, paper) == 1 / 16
    assert kl_weight_at(0, paper) == 0.0 and kl_weight_at(5_000, paper) == 6.6
    assert lr_at(0, paper) == 1e-4 and lr_at(1_200_000, paper) == 1.25e-6
    for name in ("tiny", "small"):
        cfg = get_profile(name).dvae
        assert temperature_at(cfg.total_steps, cfg) == cfg.temperature_end
        assert kl_weight_at(cfg.total_steps, cfg) == cfg.kl_weight


def test_config_paper_defaults_and_round_trip():
    p = get_profile("paper-1.3B").dvae
    assert (p.image_size, p.group_count, p.n_hid, p.n_blk_per_group, p.vocab_size) == (256, 4, 256, 2, 8192)
    assert p.betas == (0.9, 0.999) and p.eps == 1e-8 and p.weight_decay == 1e-4
    assert (p.lr, p.lr_end, p.kl_weight, p.temperature_end, p.ema_decay) == (1e-4, 1.25e-6, 6.6, 1 / 16, 0.999)
    assert (p.kl_warmup_steps, p.temp_anneal_steps) == (5_000, 150_000)
    for name in profile_names():
        cfg = get_profile(name).dvae
        assert DVAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="missing shape fields"):
        DVAEConfig.from_dict({"image_size": 32})


# -----------------------------------------------------------------------------
# The released weights: whole pickled `dall_e` modules


def _write_fake_release(tmp_path, enc: nn.Module, dec: nn.Module):
    """Pickle our modules under the class paths of the dall_e package, as
    torch.save(module) did for the released encoder.pkl / decoder.pkl."""
    mods = {name: types.ModuleType(name) for name in ("dall_e", "dall_e.encoder", "dall_e.decoder", "dall_e.utils")}
    mods["dall_e"].__path__ = []
    fake = {}
    for modname, cls in [("dall_e.utils", dvae_model.Conv2d), ("dall_e.encoder", dvae_model.EncoderBlock),
                         ("dall_e.encoder", dvae_model.Encoder), ("dall_e.decoder", dvae_model.DecoderBlock),
                         ("dall_e.decoder", dvae_model.Decoder)]:
        sub = type(cls.__name__, (cls,), {"__module__": modname, "__qualname__": cls.__name__})
        setattr(mods[modname], cls.__name__, sub)
        fake[cls] = sub
    saved = {k: sys.modules.get(k) for k in mods}
    sys.modules.update(mods)
    try:
        for m in list(enc.modules()) + list(dec.modules()):
            if type(m) in fake:
                m.__class__ = fake[type(m)]
        torch.save(enc, tmp_path / "encoder.pkl")
        torch.save(dec, tmp_path / "decoder.pkl")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    raw = (tmp_path / "encoder.pkl").read_bytes()
    with torch.serialization._open_zipfile_reader(io.BytesIO(raw)) as z:  # noqa: SLF001
        pickled = z.get_record("data.pkl")
    assert b"dall_e.encoder" in pickled and b"dall_e.utils" in pickled
    return tmp_path / "encoder.pkl", tmp_path / "decoder.pkl"


def test_load_released_dvae_from_pickled_dall_e_modules(tmp_path):
    torch.manual_seed(0)
    enc, dec = build_dvae(TINY)
    x = torch.rand(2, 3, 32, 32)
    codes = encode_to_codes(enc, x)
    images = decode_codes(dec, codes)
    enc_pkl, dec_pkl = _write_fake_release(tmp_path, enc, dec)
    assert "dall_e" not in sys.modules

    enc2, dec2, cfg = load_released_dvae(enc_pkl, dec_pkl, image_size=32)
    assert "dall_e" not in sys.modules  # the stub is removed again
    assert type(enc2) is Encoder and type(dec2) is Decoder
    assert cfg.shape_dict() == TINY.shape_dict()
    assert torch.equal(encode_to_codes(enc2, x), codes)
    assert torch.equal(decode_codes(dec2, codes), images)
    with pytest.raises(ValueError, match="swapped"):
        load_released_dvae(dec_pkl, enc_pkl, image_size=32)
    # a plain pickle load without the stub fails: the files need the dall_e path
    with pytest.raises(Exception):
        torch.load(enc_pkl, weights_only=False)


def test_released_module_aliases_restores_sys_modules():
    sentinel = types.ModuleType("dall_e")
    sys.modules["dall_e"] = sentinel
    try:
        with released_module_aliases():
            import dall_e.encoder as e  # the stub, not a real package

            assert e.Encoder is Encoder
        assert sys.modules["dall_e"] is sentinel and "dall_e.encoder" not in sys.modules
    finally:
        sys.modules.pop("dall_e", None)


def test_convert_released_state_dict_checks_names_and_shapes():
    torch.manual_seed(0)
    enc, dec = build_dvae(TINY)
    out = convert_released_state_dict(enc.state_dict())
    assert list(out) == list(enc.state_dict()) and all(torch.equal(out[k], v) for k, v in enc.state_dict().items())
    out = convert_released_state_dict(dec.state_dict())  # kind inferred: decoder
    assert set(out) == set(dec.state_dict())
    # the full released layout (on meta: names and shapes only) passes the name check
    ref_enc, _ = _released_pair()
    sd = dict(ref_enc.state_dict())
    del sd["blocks.group_2.block_1.id_path.w"]
    sd["blocks.group_2.block_1.extra"] = torch.empty(1, device="meta")
    sd["blocks.group_1.block_1.res_path.conv_1.w"] = torch.empty(64, 256, 1, 1, device="meta")
    with pytest.raises(ValueError) as err:
        convert_released_state_dict(sd, config=get_profile("paper-12B").dvae)
    msg = str(err.value)
    assert "missing keys (1): ['blocks.group_2.block_1.id_path.w']" in msg
    assert "unexpected keys (1): ['blocks.group_2.block_1.extra']" in msg
    assert "blocks.group_1.block_1.res_path.conv_1.w: got (64, 256, 1, 1), expected (64, 256, 3, 3)" in msg
    # a tiny state dict against the paper's config: shape mismatches named
    with pytest.raises(ValueError, match="shape mismatches"):
        convert_released_state_dict(enc.state_dict(), "encoder", DVAEConfig(image_size=32, group_count=3))


def test_marginal_kl_penalises_collapse_not_confidence():
    from dalle_core.dvae.losses import marginal_kl_to_uniform

    K = 16
    # confident codes, all different across positions: no penalty (each code used once)
    codes = torch.arange(K).view(1, 4, 4)
    confident = torch.nn.functional.one_hot(codes, K).permute(0, 3, 1, 2).float() * 50.0
    assert float(marginal_kl_to_uniform(confident)) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_to_uniform(confident).mean()) == pytest.approx(math.log(K), abs=1e-4)  # the ELB's KL is maximal
    # every position on the same code: the maximum, log K
    collapsed = torch.zeros(1, K, 4, 4)
    collapsed[:, 3] = 50.0
    assert float(marginal_kl_to_uniform(collapsed)) == pytest.approx(math.log(K), abs=1e-4)
    # the ELB adds it per pixel value, once per position, with its own weight
    images = torch.rand(1, 3, 16, 16)
    out0 = elb_loss(images, collapsed, torch.zeros(1, 6, 16, 16), kl_weight=1.0)
    out1 = elb_loss(images, collapsed, torch.zeros(1, 6, 16, 16), kl_weight=1.0, marginal_kl_weight=2.0)
    assert "marginal_kl" not in out0
    assert float(out1["marginal_kl"]) == pytest.approx(math.log(K) * 16 / (3 * 16 * 16), rel=1e-4)
    assert float(out1["total"] - out0["total"]) == pytest.approx(2.0 * float(out1["marginal_kl"]), rel=1e-5)


def test_pixel_mse_is_the_error_of_the_decoded_image():
    """The optional squared-error term: the MSE of what decode_codes returns
    (unmap(sigmoid(mu))) against the input, added to the ELB with its weight."""
    from dalle_core.dvae.losses import pixel_mse
    from dalle_core.dvae.model import unmap_pixels

    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16)
    out = torch.randn(2, 6, 16, 16) * 0.5  # decoded values stay inside [0, 1]: no clamp
    logits = torch.randn(2, 8, 4, 4)
    decoded = unmap_pixels(torch.sigmoid(out[:, :3]))
    assert float(pixel_mse(images, out[:, :3])) == pytest.approx(float(((decoded - images) ** 2).mean()), rel=1e-5)
    # a perfect reconstruction costs nothing
    perfect_mu = torch.logit(map_pixels(images))
    assert float(pixel_mse(images, perfect_mu)) == pytest.approx(0.0, abs=1e-10)
    paper = elb_loss(images, logits, out, kl_weight=1.0)
    mixed = elb_loss(images, logits, out, kl_weight=1.0, pixel_mse_weight=30.0)
    assert "pixel_mse" not in paper  # weight 0: the paper's ELB, untouched
    assert float(mixed["total"] - paper["total"]) == pytest.approx(30.0 * float(mixed["pixel_mse"]), rel=1e-5)
    # its gradient reaches a pixel predicted beyond white (unlike the clamped unmap)
    mu = torch.full((1, 3, 2, 2), 8.0, requires_grad=True)
    pixel_mse(torch.full((1, 3, 2, 2), 0.5), mu).backward()
    assert float(mu.grad.abs().min()) > 0
