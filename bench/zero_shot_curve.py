"""Caption following against prior training: the curve that sets the demo's budget.

Trains the prior of a profile on the image codes of a finished demo run (its
storage root: image_codes/, tokenizer/, dvae/, coco_eval/), in segments that
resume one another (a resumed run equals an uninterrupted one: tested in
tests/test_prior_train.py), and after each segment draws N candidates for
held-out and for training captions and checks them with the demo world's own
checker. Prints one JSON line per point and a final JSON object:

    {"points": [{"steps", "train_s", "heldout": {"first_draw", "any_of_n", "colours",
                 "shapes", "relation"}, "train": {...}}, ...], ...}

"first_draw" is the prior without reranking; "any_of_n" what a perfect reranker
would pick (the reranker is measured separately: bench/reranker.py). Wall-clock
"train_s" is the trainer's own time (no evaluation).

    .venv/bin/python bench/zero_shot_curve.py --run-dir runs/demo --points 600 1200 1800 2400 \\
        --precision bf16 --lr 2e-3 --out /tmp/curve-bf16-2e-3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from overrides import parse_overrides  # noqa: E402  (bench/overrides.py, beside this script)

from dalle_core.data import coco  # noqa: E402
from dalle_core.demo.captions import random_caption  # noqa: E402
from dalle_core.demo.checker import check_image  # noqa: E402
from dalle_core.demo.scenes import random_scene  # noqa: E402
from dalle_core.dvae.evaluate import tensor_to_image  # noqa: E402
from dalle_core.dvae.model import load_dvae  # noqa: E402
from dalle_core.generation import TextToImage  # noqa: E402
from dalle_core.prior.model import load_prior  # noqa: E402
from dalle_core.prior.train import main as train_main  # noqa: E402
from dalle_core.profiles import get_profile, read_code_manifest, write_resolved_profile  # noqa: E402
from dalle_core.text.bpe import DalleTokenizer  # noqa: E402


def heldout_captions(storage: Path, n: int) -> list[str]:
    items = coco.load_coco_captions(storage / "coco_eval" / "captions.json", None)
    return [im.captions[0] for im in items][:n]


def training_captions(n: int, seed: int = 1) -> list[str]:
    """Captions of training compositions, written as the crawl writes them."""
    rng = np.random.default_rng(seed)
    return [random_caption(random_scene(rng, split="train"), rng) for _ in range(n)]


def caption_following(chain: TextToImage, captions: list[str], n: int, seed: int = 0,
                      temperature: float = 1.0, guidance_scale: float = 1.0) -> dict:
    out = chain.generate(captions, n=n, seed=seed, rerank=False, return_candidates=True,
                         temperature=temperature, guidance_scale=guidance_scale)
    checks = [[check_image(tensor_to_image(x), c) for x in out.candidates[i]] for i, c in enumerate(captions)]
    flat = [r for row in checks for r in row]
    return {"first_draw": float(np.mean([row[0].match for row in checks])),
            "any_of_n": float(np.mean([any(r.match for r in row) for row in checks])),
            "all_draws": float(np.mean([r.match for r in flat])),
            "colours": float(np.mean([r.colours for r in flat])),
            "shapes": float(np.mean([r.shapes for r in flat])),
            "relation": float(np.mean([r.relation for r in flat]))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, required=True, help="a finished demo run (its storage/ is used)")
    p.add_argument("--profile", default="small")
    p.add_argument("--points", type=int, nargs="+", required=True, help="prior updates at which to evaluate")
    p.add_argument("--precision", default=None, help="fp32 | bf16 (default: the profile's)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--lr-cooldown-steps", type=int, default=None,
                   help="linear decay to 0 over the last N updates of each segment (use with one point)")
    p.add_argument("--attention", default=None, help="sdpa | block | auto (default: the profile's)")
    p.add_argument("--prior-set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="PriorConfig fields to change (bench/overrides.py), e.g. n_head=8 text_loss_weight=0.0")
    p.add_argument("--training-set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="PriorTrainingConfig fields to change (bench/overrides.py), e.g. weight_decay=0.0")
    p.add_argument("--text-set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="TextConfig fields to change, e.g. bpe_dropout=0.0 (the prior's training rate follows it)")
    p.add_argument("--captions", type=int, default=100, help="held-out captions per point")
    p.add_argument("--train-captions", type=int, default=50)
    p.add_argument("--candidates", type=int, default=8)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0],
                   help="classifier-free guidance scales to evaluate at each point (1: none; >1 needs "
                        "--training-set caption_dropout=...)")
    p.add_argument("--weights", nargs="+", default=["ema"], choices=["ema", "raw"],
                   help="which weights to draw from at each point: the EMA the platform samples with, "
                        "and/or the raw last update")
    p.add_argument("--out", type=Path, required=True, help="training folder (resumed between points)")
    args = p.parse_args()

    storage = args.run_dir / "storage"
    tok = DalleTokenizer.from_json((storage / "tokenizer" / "bpe.json").read_text())
    _, decoder, _ = load_dvae(storage / "dvae" / "dvae.pt")
    held, train = heldout_captions(storage, args.captions), training_captions(args.train_captions)
    extra = [a for k, v in (("--precision", args.precision), ("--lr", args.lr), ("--batch-size", args.batch_size),
                            ("--warmup-steps", args.warmup_steps),
                            ("--attention", args.attention), ("--lr-cooldown-steps", args.lr_cooldown_steps)) if v is not None for a in (k, str(v))]
    which = ["--profile", args.profile]
    if args.prior_set or args.training_set or args.text_set:
        # a changed profile goes to the trainer the way every launcher hands it one: resolved, as JSON
        profile = get_profile(args.profile)
        # the stages that derive from the text's fields (the prior's BPE dropout) follow it
        profile = profile.with_stage("text", **parse_overrides(args.text_set, profile.text, "--text-set"))
        profile = replace(profile,
                          prior=profile.prior.replace(**parse_overrides(args.prior_set, profile.prior, "--prior-set")),
                          prior_training=profile.prior_training.replace(
                              **parse_overrides(args.training_set, profile.prior_training, "--training-set")))
        args.out.mkdir(parents=True, exist_ok=True)
        manifest, source = read_code_manifest(storage)
        which = ["--profile-json", str(write_resolved_profile(profile, manifest, args.out / "profile.json", source))]
    points, train_s = [], 0.0
    for steps in sorted(args.points):
        t = time.perf_counter()
        train_main([*which, "--codes", str(storage), "--out", str(args.out), "--steps", str(steps),
                    "--checkpoint-every", str(steps), "--log-every", "100", "--quiet", *extra])
        train_s += time.perf_counter() - t
        for weights in args.weights:
            prior = load_prior(args.out / "prior.pt", use_ema=weights == "ema").eval()
            chain = TextToImage(prior, decoder, tok)
            for scale in args.guidance:
                t = time.perf_counter()
                kw = {"temperature": args.temperature, "guidance_scale": scale}
                point = {"steps": steps, "train_s": round(train_s, 1), "weights": weights, "guidance": scale,
                         "heldout": caption_following(chain, held, args.candidates, **kw),
                         "train": caption_following(chain, train, args.candidates, **kw), "eval_s": 0.0}
                point["eval_s"] = round(time.perf_counter() - t, 1)
                points.append(point)
                print(json.dumps(point), flush=True)
    print(json.dumps({"benchmark": "zero_shot_curve", "profile": args.profile, "precision": args.precision,
                      "lr": args.lr, "batch_size": args.batch_size, "attention": args.attention, "lr_cooldown_steps": args.lr_cooldown_steps,
                      "prior_set": args.prior_set, "training_set": args.training_set, "text_set": args.text_set, "captions": args.captions,
                      "candidates": args.candidates, "temperature": args.temperature, "points": points, "threads": torch.get_num_threads(),
                      "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}))


if __name__ == "__main__":
    main()
