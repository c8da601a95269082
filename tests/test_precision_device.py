"""The "auto" precision (dalle_core.precision.device) and the CPU bf16 paths it enables."""

from __future__ import annotations

import pytest
import torch

from dalle_core.dvae import train_dvae
from dalle_core.dvae.model import build_dvae, map_pixels
from dalle_core.precision import device as dev
from dalle_core.prior.config import PriorTrainingConfig
from dalle_core.prior.train import resolve_precision
from dalle_core.profiles import get_profile


@pytest.fixture
def cpu_bf16(monkeypatch):
    def set_(on: bool | None):
        if on is None:
            monkeypatch.delenv(dev.CPU_BF16_ENV, raising=False)
        else:
            monkeypatch.setenv(dev.CPU_BF16_ENV, "1" if on else "0")
    return set_


def test_auto_is_bf16_only_on_a_cpu_with_bf16_instructions(cpu_bf16, monkeypatch):
    cpu_bf16(True)
    assert dev.fast_low_precision("cpu") == "bf16"
    assert resolve_precision(None, PriorTrainingConfig(amp_dtype="auto"), "cpu") == "bf16"
    cpu_bf16(False)
    assert dev.fast_low_precision("cpu") == "fp32"
    assert resolve_precision(None, PriorTrainingConfig(amp_dtype="auto"), "cpu") == "fp32"
    assert resolve_precision("auto", PriorTrainingConfig(amp_dtype="fp16"), "cpu") == "fp32"
    # without the override the CPU's flags decide
    cpu_bf16(None)
    monkeypatch.setattr(dev, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert dev.cpu_has_fast_bf16()
    monkeypatch.setattr(dev, "_cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert not dev.cpu_has_fast_bf16()
    # explicit choices are never changed; the paper's profiles keep fp16
    assert resolve_precision(None, PriorTrainingConfig(amp_dtype="fp32"), "cpu") == "fp32"
    assert get_profile("paper-12B").prior_training.amp_dtype == "fp16"
    with pytest.raises(ValueError, match="amp_dtype"):
        PriorTrainingConfig(amp_dtype="bf17")


def _batches(start):
    g = torch.Generator().manual_seed(start)
    while True:
        yield torch.rand(4, 3, 32, 32, generator=g)


def test_dvae_cpu_bf16_trains_and_keeps_the_release_fp32_layers(cpu_bf16, tmp_path):
    cfg = get_profile("tiny").dvae.replace(total_steps=6, log_every=2, checkpoint_every=100, cpu_bf16=True)
    cpu_bf16(True)
    enc, dec = build_dvae(cfg, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = enc(map_pixels(torch.rand(2, 3, 32, 32)))
        hidden = enc.blocks.input(map_pixels(torch.rand(2, 3, 32, 32)))
    assert logits.dtype == torch.float32  # the encoder's logits conv is fp32 in the release
    assert hidden.dtype == torch.bfloat16  # the other convs run in bf16
    logs = []
    bf16 = train_dvae(cfg, _batches, tmp_path / "bf16", on_log=lambda s, m: logs.append(m))
    assert all(torch.isfinite(torch.tensor(m["total"])) for m in logs)
    # without bf16 instructions the same config trains in fp32: bitwise what cpu_bf16=False gives
    cpu_bf16(False)
    a = train_dvae(cfg, _batches, tmp_path / "a")
    b = train_dvae(cfg.replace(cpu_bf16=False), _batches, tmp_path / "b")
    for (k, x), (_, y) in zip(a.raw_encoder.state_dict().items(), b.raw_encoder.state_dict().items()):
        assert torch.equal(x, y), k
    # and bf16 really changed the arithmetic
    assert any(not torch.equal(x, y) for x, y in zip(bf16.raw_encoder.state_dict().values(),
                                                    a.raw_encoder.state_dict().values()))
