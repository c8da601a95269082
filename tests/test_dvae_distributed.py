"""Data-parallel dVAE training (issue 16, item 3) and the paper's training-time crop.

- the random crop + resize (dalle_core/dvae/augment.py): drawn per image from (seed,
  step, index in the global batch), so a batch split over ranks is cropped as a whole
  one; on in the paper presets only;
- 2 gloo processes, each reading its share of the global batch, end with the weights
  of 1 process on the same global batch (k-means init, marginal KL, random crop and
  EMA included); a 2-process run stopped after 3 updates and resumed (this time every
  rank reading the whole global batch and keeping its share) ends where the
  uninterrupted one does.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dalle_core.dvae.augment import crop_window, random_crop_resize
from dalle_core.dvae.config import DVAEConfig
from dalle_core.profiles import get_profile

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "dvae_dist_worker.py"


def test_crop_is_a_function_of_seed_step_and_global_index():
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    whole = random_crop_resize(x, seed=3, step=7)
    halves = torch.cat([random_crop_resize(x[:4], 3, 7, first_index=0), random_crop_resize(x[4:], 3, 7, first_index=4)])
    assert torch.equal(whole, halves)  # rank r of 2 crops images 4r.. as one process does
    assert torch.equal(whole, random_crop_resize(x, seed=3, step=7))  # a resumed run redraws them
    assert not torch.equal(whole, random_crop_resize(x, seed=3, step=8))
    assert whole.shape == x.shape and whole.dtype == x.dtype and 0 <= whole.min() and whole.max() <= 1


def test_crop_windows_follow_the_paper_listing():
    """Listing 1: resize to t ~ U{9/8 S .. 12/8 S}, crop S: a window of S*S/t, i.e. 2/3 .. 8/9 of the side;
    flipped about half of the time."""
    s, sides, flips = 256, [], 0
    for i in range(400):
        top, left, side, flipped = crop_window(s, seed=0, step=0, index=i)
        assert 0 <= top <= s - side and 0 <= left <= s - side
        sides.append(side)
        flips += flipped
    assert round(s * 8 / 12) <= min(sides) and max(sides) <= round(s * 8 / 9)
    assert max(sides) - min(sides) > 40  # the zoom varies over the range
    assert 150 < flips < 250


def test_a_crop_is_a_zoom_of_the_window():
    x = torch.arange(32.0).repeat(1, 3, 32, 1) / 32  # value = column / 32
    top, left, side, flipped = crop_window(32, 1, 2, 0, flip=False)
    y = random_crop_resize(x, 1, 2, flip=False)
    assert y[0, 0, 0, 0] == pytest.approx(x[0, 0, 0, left], abs=1 / 32)  # starts at the window's column
    assert y[0, 0, 0, -1] == pytest.approx(x[0, 0, 0, left + side - 1], abs=1 / 32)
    assert torch.all(y[0, 0, 0, 1:] >= y[0, 0, 0, :-1])  # not flipped: columns still increase


def test_the_crop_is_on_in_the_paper_presets_only():
    for name in ("paper-1.3B", "paper-12B"):
        assert get_profile(name).dvae.random_crop
    for name in ("tiny", "small"):  # the demo trains on its images as they are
        assert not get_profile(name).dvae.random_crop
    assert not DVAEConfig().random_crop
    cfg = DVAEConfig(random_crop=True)
    assert DVAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="random_crop_zoom"):
        DVAEConfig(random_crop_zoom=(0.5, 1.0))


# --- data parallel ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, out: Path, steps: int, source: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
           str(WORKER), str(out), str(steps), source]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def load(out: Path) -> tuple[dict, dict]:
    return torch.load(out / "params.pt"), json.loads((out / "history.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dvae-dp")
    torchrun(1, root / "one", 6, "global")
    torchrun(2, root / "two", 6, "share")
    return {"one": root / "one", "two": root / "two", "root": root}


@pytest.mark.timeout(600)
def test_two_ranks_train_the_weights_of_one_process_on_the_global_batch(runs):
    one, h1 = load(runs["one"])
    two, h2 = load(runs["two"])
    assert sorted(one) == sorted(two)
    # raw and EMA weights after 6 updates. The worker's lr 5e-4 and Adam eps 1e-3 keep the
    # reduction order's rounding (3e-8 after one update) from being amplified by Adam on
    # near-zero gradients; a marginal KL left per rank differs by 5e-4.
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert worst < 2e-6, worst
    assert [r["step"] for r in h2["history"]] == list(range(1, 7))
    for a, b in zip(h1["history"], h2["history"]):  # the logged losses are the global batch's
        for k in ("total", "recon", "kl", "marginal_kl", "pixel_mse", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (a["step"], k)


@pytest.mark.timeout(600)
def test_a_two_rank_run_resumes_to_the_uninterrupted_weights(runs):
    out = runs["root"] / "resumed"
    torchrun(2, out, 3, "global")  # stops after 3 updates (a checkpoint at 2 and at 3)
    first, h = load(out)
    assert h["step"] == 3 and h["resumed_from"] is None
    torchrun(2, out, 6, "global")  # the same run, continued to 6
    resumed, h = load(out)
    assert h["resumed_from"] == 3 and h["step"] == 6
    two, _ = load(runs["two"])
    worst = max(float((resumed[k] - two[k]).abs().max()) for k in two)
    assert worst < 1e-7, worst
