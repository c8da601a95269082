"""The prior's learning rate: warm-up, then halved each time the loss plateaus (issue 13, part 3).

Synthetic loss curves for a paper-length run (430k updates, warm-up 5k):
L(t) = a + b t^-alpha, with per-update noise of 0.5% of the loss (batch 1024 x
1280 tokens; the 1% and 2% cases are in docs/benchmarks.md) and a 1.5x loss
spike once in ~10k updates; a "true plateau" holds L constant from t_p on.

Before / after (2026-11-30, seed 1, PriorConfig() = paper-12B defaults):

- healthy curve 2.9 + 9 t^-0.3 (still 2.1% better per e-fold of updates at 430k,
  0.004% per 1,000 updates): the old rule (1% better over a 1,000-update window)
  halved at updates 7,000, 9,000, 11,000, 13,000 and 15,000: all five decays in
  the first 3.5% of the run. The new detector: no decay. Nor on 3 + 4 t^-0.4
  (0.36% per e-fold at the end) or 3 + 6 t^-0.45 (0.33%).
- the same curve flattened at t_p = 60k / 150k / 300k: first decay 14k / 33k /
  51k updates later (bound tested: 0.3 t_p); further decays at least
  `lr_plateau_min_gap` (20k) apart, five at most.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from dalle_core.prior.lr_schedule import (
    CONTROL_FILE,
    WarmupThenHalveOnPlateau,
    read_lr_requests,
    request_lr_action,
)
from dalle_core.prior.train import LRSchedule, train_prior
from dalle_core.profiles import get_profile
from dalle_core.storage import LocalStorage

PAPER_12B = get_profile("paper-12B").prior_training  # the paper's training settings

T = 430_000
LOG_EVERY = 100  # the paper profile's log interval: the trainer polls the control file this often


def losses(a: float, b: float, alpha: float, plateau_at: int | None = None, sigma: float = 0.005,
           seed: int = 1, total: int = T) -> list[float]:
    rng = random.Random(seed)
    out = []
    for t in range(1, total + 1):
        tt = t if plateau_at is None else min(t, plateau_at)
        x = (a + b * tt**-alpha) * (1 + sigma * rng.gauss(0.0, 1.0))
        if rng.random() < 1e-4:
            x *= 1.5  # the odd loss spike
        out.append(x)
    return out


def paper() -> WarmupThenHalveOnPlateau:
    return WarmupThenHalveOnPlateau.from_config(PAPER_12B)


def decay_steps(schedule, ls: list[float], start: int = 1) -> list[int]:
    steps = []
    for t in range(start, len(ls) + 1):
        steps += [d["step"] for d in schedule.observe(t, ls[t - 1]) if d["action"] == "decay"]
    return steps


@pytest.fixture(scope="module")
def healthy():
    return losses(2.9, 9.0, 0.3)


def test_healthy_large_run_old_rule_halves_five_times_early_new_rule_never(healthy):
    old = WarmupThenHalveOnPlateau(4.5e-4, 5000, 0.5, 5, window=1000, threshold=0.01)  # the rule before
    assert decay_steps(old, healthy) == [7000, 9000, 11000, 13000, 15000]
    new = paper()
    assert decay_steps(new, healthy) == [] and new.decisions == []
    assert new.lr_at(T - 1) == pytest.approx(4.5e-4)
    end_gain = (2.9 + 9.0 * (T / math.e) ** -0.3) / (2.9 + 9.0 * T**-0.3) - 1
    assert end_gain > 0.02  # still improving 2% per e-fold: a plateau detector must keep quiet


@pytest.mark.parametrize("curve", [(3.0, 4.0, 0.4), (3.0, 6.0, 0.45)])
def test_slow_but_healthy_curves_are_not_plateaus(curve):
    a, b, alpha = curve
    gain = (a + b * (T / math.e) ** -alpha) / (a + b * T**-alpha) - 1
    assert 0.003 < gain < 0.004  # per e-fold at the end of the run; the threshold is 0.185%
    assert decay_steps(paper(), losses(a, b, alpha, seed=2)) == []


@pytest.mark.parametrize("t_p", [60_000, 150_000, 300_000])
def test_decay_soon_after_a_true_plateau(t_p):
    steps = decay_steps(paper(), losses(2.9, 9.0, 0.3, plateau_at=t_p, seed=3))
    assert steps, f"no decay after a plateau at {t_p}"
    assert t_p < steps[0] <= t_p + 0.3 * t_p  # measured: +14k, +33k, +51k


def test_at_most_five_decays_min_gap_respected():
    s = paper()
    steps = decay_steps(s, losses(2.9, 9.0, 0.3, plateau_at=20_000, seed=4))
    assert len(steps) == 5 == s.decays  # flat for 410k updates: all five, then no more
    assert all(b - a >= PAPER_12B.lr_plateau_min_gap for a, b in zip(steps, steps[1:]))
    assert s.lr_at(T) == pytest.approx(4.5e-4 / 32)
    assert [d["source"] for d in s.decisions] == ["detector"] * 5


# --- the operator ---------------------------------------------------------------------------------

def drive(schedule, ls, storage, first: int, last: int, requests_at: dict[int, list[str]] | None = None):
    """The trainer's loop: observe each update's loss, poll the control file at each log interval;
    `requests_at[t]`: actions the operator writes (the CLI's call) just after update t."""
    out = []
    for t in range(first, last + 1):
        out += schedule.observe(t, ls[t - 1])
        if t % LOG_EVERY == 0 or t == first:
            out += schedule.apply_requests(t, read_lr_requests(storage))
        for action in (requests_at or {}).get(t, []):
            request_lr_action(storage, action, note=f"test at {t}")
    return out


def test_operator_force_decays_at_the_next_poll_and_hold_blocks_the_detector(tmp_path, healthy):
    storage = LocalStorage(tmp_path)
    s = paper()
    plateau = losses(2.9, 9.0, 0.3, plateau_at=60_000, seed=3)  # the detector alone: first decay at 74k
    got = drive(s, plateau, storage, 1, 200_000,
                requests_at={30_050: ["decay"], 50_000: ["hold"], 150_000: ["release"]})
    forced, hold, release, *later = got
    assert (forced["step"], forced["action"], forced["source"]) == (30_100, "decay", "operator")
    assert forced["request_seq"] == 1 and forced["note"] == "test at 30050"
    assert forced["new_lr"] == pytest.approx(2.25e-4)
    assert (hold["step"], hold["action"], release["step"], release["action"]) == (50_100, "hold", 150_100, "release")
    # held through the plateau: no detector decay until released, then soon one
    assert later and later[0]["source"] == "detector" and 150_100 < later[0]["step"] <= 160_000
    assert all(d["step"] > 150_100 for d in later)
    assert json.loads((tmp_path / CONTROL_FILE).read_text())["requests"][-1]["action"] == "release"
    # a request is applied once, however often the file is read again
    assert s.apply_requests(200_100, read_lr_requests(storage)) == []


def test_operator_decay_beyond_five_is_refused_and_recorded(tmp_path):
    s = WarmupThenHalveOnPlateau(1e-3, 10, max_decays=1)
    storage = LocalStorage(tmp_path)
    request_lr_action(storage, "decay")
    request_lr_action(storage, "decay")
    a, b = s.apply_requests(20, read_lr_requests(storage))
    assert (a["action"], b["action"], b["request"]) == ("decay", "refused", "decay") and s.decays == 1
    with pytest.raises(ValueError, match="must be one of"):
        request_lr_action(storage, "double")


def test_state_round_trips_and_resume_takes_the_same_decisions(tmp_path):
    ls = losses(2.9, 9.0, 0.3, plateau_at=40_000, seed=5, total=200_000)
    requests = {70_000: ["hold"], 90_000: ["release"], 150_000: ["decay"]}
    full = paper()
    d_full = drive(full, ls, LocalStorage(tmp_path / "a"), 1, 200_000, requests_at=requests)
    assert any(d["source"] == "detector" for d in d_full) and any(d["source"] == "operator" for d in d_full)

    part = paper()
    storage = LocalStorage(tmp_path / "b")
    cut = 120_437  # mid-block, after a hold / release and detector decays
    d1 = drive(part, ls, storage, 1, cut, requests_at=requests)
    # a checkpoint (JSON meta) and a fresh process
    resumed = LRSchedule.from_config(PAPER_12B)
    resumed.load_state_dict(json.loads(json.dumps(part.state_dict())))
    assert resumed.state_dict() == json.loads(json.dumps(part.state_dict()))
    d2 = drive(resumed, ls, storage, cut + 1, 200_000, requests_at=requests)
    assert d1 + d2 == d_full
    assert resumed.decisions == d_full and resumed.decays == full.decays
    assert resumed.lr_at(200_000) == full.lr_at(200_000)


# --- the trainer and the command line --------------------------------------------------------------

def random_batches(config, batch_size, seed=0):
    def fn(start):
        g = torch.Generator().manual_seed(seed + start)
        while True:
            yield (torch.randint(0, config.text_vocab_size, (batch_size, config.text_len), generator=g),
                   torch.randint(0, config.image_vocab_size, (batch_size, config.image_len), generator=g))
    return fn


def test_trainer_applies_an_operator_decay_logs_it_and_keeps_it_across_resume(tmp_path):
    from orchestration.cli import main

    profile = get_profile("tiny")
    tiny, training = profile.prior, profile.prior_training.replace(batch_size=2)
    run = tmp_path / "run"
    run.mkdir()
    assert main(["lr", "decay", "--run-dir", str(run), "--note", "looked flat"]) == 0
    logs: list[dict] = []
    train_prior(tiny, training, random_batches(tiny, 2), run, on_log=logs.append, total_steps=6, log_every=3,
                checkpoint_every=3, save_final=False)
    events = [r for r in logs if r["event"] == "lr_schedule"]
    assert len(events) == 1
    e = events[0]
    assert (e["step"], e["action"], e["source"], e["note"], e["lr_decays"]) == (1, "decay", "operator", "looked flat", 1)
    lrs = {r["step"]: r["lr"] for r in logs if r["event"] == "log"}
    assert lrs[1] == pytest.approx(1e-3 / 10) and lrs[3] == pytest.approx(1e-3 * 3 / 10 * 0.5)
    # resume: the decision is in the checkpoint, the request is not applied twice; a hold arrives
    assert main(["lr", "hold", "--run-dir", str(run)]) == 0
    logs2: list[dict] = []
    train_prior(tiny, training, random_batches(tiny, 2), run, on_log=logs2.append, total_steps=8, log_every=3, save_final=False)
    events2 = [r for r in logs2 if r["event"] == "lr_schedule"]
    assert [(e["step"], e["action"], e["request_seq"]) for e in events2] == [(7, "hold", 2)]
    assert [r["lr"] for r in logs2 if r["event"] == "log"][0] == pytest.approx(1e-3 * 7 / 10 * 0.5)


def test_cli_lr_refuses_a_missing_run_dir(tmp_path, capsys):
    from orchestration.cli import main

    assert main(["lr", "decay", "--run-dir", str(tmp_path / "nope")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists()


def test_cooldown_falls_linearly_over_the_last_updates_and_is_off_by_default():
    """lr_cooldown_steps (not the paper's): the last N updates of the run take lr x N/(N+1),
    ..., 1/(N+1); before them, and with N = 0, the paper's schedule as it was."""
    from dalle_core.prior.config import PriorTrainingConfig

    cfg = PriorTrainingConfig(lr=1.0, warmup_steps=2, total_steps=10, lr_cooldown_steps=4)
    s = LRSchedule.from_config(cfg)
    assert [round(s.lr_at(i), 6) for i in range(10)] == [0.5, 1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2]
    # the trainer's own total (e.g. --steps) is where it ends
    s = LRSchedule.from_config(cfg, total_steps=8)
    assert [round(s.lr_at(i), 6) for i in range(4, 8)] == [0.8, 0.6, 0.4, 0.2]
    plain = LRSchedule.from_config(cfg.replace(lr_cooldown_steps=0))
    assert [plain.lr_at(i) for i in range(2, 10)] == [1.0] * 8
    # a plateau halving multiplies the cooled rate
    s.decays = 1
    assert s.lr_at(7) == pytest.approx(0.1)
    # left out of the dict while off: digests of runs without it do not change
    assert "lr_cooldown_steps" not in cfg.replace(lr_cooldown_steps=0).to_dict()
    assert PriorTrainingConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="lr_cooldown_steps must be in"):
        cfg.replace(lr_cooldown_steps=11)
