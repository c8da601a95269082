"""The reranker's binding: the new design next to the old one, trained in the same run.

Trains the contrastive reranker (`dalle_core.rerank`) with the project's trainer
on the demo world's training pairs (what a correct crawl of the profile's world
keeps: the same items, resized and centre-cropped as the crawler does, captions
encoded with BPE dropout as the reranker asset does), once per variant, and
scores each on the world's held-out compositions (the evaluation set):

- ``retrieval_image_to_text`` / ``retrieval_text_to_image``: the own caption
  (image) among all held-out ones;
- ``swap_binding``: true caption above the caption with two random content
  words swapped; ``attribute_binding``: above the caption with two attribute
  words of one kind swapped or the relation reversed (one per kind the
  caption allows), and that split by kind;
- ``pick_accuracy_of_8``: the held-out image among 8 candidates for its
  caption: itself and 7 renders of the same item (same size, same random
  layout seed) with the scene perturbed so that it no longer matches the
  caption (colours swapped, shapes swapped, relation reversed, a colour or a
  shape replaced, sizes swapped when the caption states them); the oracle
  (any-of-8) is 1. A stand-in for reranking the prior's samples, whose
  failures are of these kinds;
- ``train_s``: the trainer's wall time (``--threads`` torch threads).

The old design is the one before issue 15: mean pooling, 3 generic swapped-word
negatives; figures of several ``--seeds`` are averaged per variant. Data are
rendered once and cached (``--cache``). Prints one JSON object; progress goes to
stderr.

    OMP_NUM_THREADS=1 .venv/bin/python bench/reranker.py                      # old vs new, small profile
    .venv/bin/python bench/reranker.py --variants old,new --seeds 0,1 --threads 2
    .venv/bin/python bench/reranker.py --variants new --set lr=3e-3 --steps 400
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from overrides import parse_overrides  # noqa: E402  (bench/overrides.py, beside this script)

from dalle_core.data.image_decode import load_rgb, resize_center_crop  # noqa: E402
from dalle_core.data.loader import image_to_tensor  # noqa: E402
from dalle_core.demo.near_misses import near_miss_sets  # noqa: E402
from dalle_core.demo.world import DemoWorld  # noqa: E402
from dalle_core.profiles import get_profile  # noqa: E402
from dalle_core.rerank import train_reranker  # noqa: E402
from dalle_core.rerank.evaluate import attribute_binding_by_kind, retrieval_figures  # noqa: E402
from dalle_core.rerank.negatives import training_batch  # noqa: E402
from dalle_core.text.bpe import train_bpe_tokenizer  # noqa: E402

# name -> (RerankerConfig overrides, negatives per image, share of binding negatives,
#          BPE dropout on the negatives too, mirrored pairs per batch)
# the design before issue 15 (the profiles' RerankerConfig defaults): flattened image
# features, mean-pooled words, 3 generic swapped-word negatives encoded without dropout
OLD = dict(image_pool="flatten", text_pool="mean", text_conv=0, token_init_std=1.0, hard_negative_weight=0.0,
           amp_dtype="fp32")
VARIANTS: dict[str, tuple[dict, int, float, bool, int]] = {
    "old": (OLD, 3, 0.0, False, 0),
    # one change at a time from the old design
    "old+drop": (OLD, 3, 0.0, True, 0),
    "old+typed": (OLD, 3, 0.67, True, 0),
    "old+cls+typed": ({**OLD, "text_pool": "cls", "token_init_std": 0.02}, 3, 0.67, True, 0),
    "old+moments+conv5": ({**OLD, "image_pool": "moments", "text_conv": 5}, 0, 0.0, True, 0),
    # the small profile's design (issue 15): channel moments, a 5-word text convolution,
    # 64 mirror images a batch, no swapped-word negatives, bf16 where it pays
    "new": ({**OLD, "image_pool": "moments", "text_conv": 5, "amp_dtype": "auto"}, 0, 0.0, True, 64),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- data -----------------------------------------------------------------------------------------

def _square(image, size: int) -> torch.Tensor:
    return image_to_tensor(resize_center_crop(image.convert("RGB"), size), size)


def build_data(profile_name: str, cache: Path) -> dict:
    if cache.exists():
        log(f"data: {cache}")
        return torch.load(cache, weights_only=False)
    prof = get_profile(profile_name)
    size = prof.data.image_size
    world = DemoWorld.from_data_config(prof.data)
    t0 = time.time()
    items = [i for i in world.all_items() if i.expected == "keep"]
    train_x = torch.stack([_square(load_rgb(i.image_bytes()), size) for i in items])
    train_caps = [i.caption for i in items]
    log(f"data: {len(items)} training pairs rendered in {time.time() - t0:.0f}s")
    ev = world.eval_items()
    eval_x = torch.stack([_square(load_rgb(i.image_bytes()), size) for i in ev])
    eval_caps = [i.caption for i in ev]
    index = {item.key: n for n, item in enumerate(ev)}  # the true images and fill-ins: already decoded
    cands = [torch.stack([eval_x[index[m.key]] if m.key in index else _square(m.image(), size) for m in group])
             for group in near_miss_sets(ev)]  # [N, 8, 3, S, S]: the true image first
    data = {"train_x": train_x, "train_caps": train_caps, "eval_x": eval_x, "eval_caps": eval_caps,
            "cands": torch.stack(cands)}
    log(f"data: {len(ev)} held-out pairs and 8 candidates each, {time.time() - t0:.0f}s in all")
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, cache)
    return data


# --- one run --------------------------------------------------------------------------------------

def batches_fn(data, tok, cfg, k: int, share: float, neg_dropout: bool, mirror: int = 0):
    x, caps = data["train_x"], data["train_caps"]
    # the variant's negatives and mirrored pairs, batched as the reranker asset batches them
    run_cfg = cfg.replace(hard_negatives=k, binding_negatives=share, mirrored_pairs=mirror)

    def fn(start: int):
        rng = random.Random(cfg.seed * 7919 + start)
        g = torch.Generator().manual_seed(cfg.seed)
        step = 0
        while True:
            perm = torch.randperm(len(caps), generator=g)
            for i in range(0, len(caps) - cfg.batch_size + 1, cfg.batch_size):
                if step >= start:
                    j = perm[i:i + cfg.batch_size]
                    c = [caps[int(t)] for t in j]
                    yield training_batch(x[j], c, tok, run_cfg, rng, negatives_dropout=neg_dropout)
                step += 1
    return fn


@torch.no_grad()
def pick_accuracy(model, tok, data) -> float:
    cands, caps = data["cands"], data["eval_caps"]
    n = cands.shape[0]
    idx, _ = model.rerank_groups(cands.flatten(0, 1), tok.encode_batch(caps), keep=1)
    return float((idx[:, 0] == torch.arange(n) * cands.shape[1]).float().mean())


def run_variant(name: str, data, tok, base, seed: int, steps: int, overrides: dict) -> dict:
    over, k, share, neg_dropout, mirror = VARIANTS[name]
    cfg = base.replace(**{**over, **overrides, "seed": seed})
    steps = over.get("total_steps", steps)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        def on_log(r: dict) -> None:
            if r.get("event") == "log" and (r["step"] % 50 == 0 or r["step"] == steps):
                log(f"  {name} step {r['step']}: loss {r['loss']:.3f} acc {r['acc']:.2f} "
                    f"acc_hard {r.get('acc_hard', float('nan')):.2f} "
                    f"temperature {r['temperature']:.4f}")
        res = train_reranker(cfg, batches_fn(data, tok, cfg, k, share, neg_dropout, mirror), tmp, total_steps=steps,
                             resume=False, save_final=False, checkpoint_every=10 ** 9, on_log=on_log,
                             log_every=10)
        train_s = time.time() - t0
        amp = next(r["amp"] for r in res.history if r["event"] == "start")
    model = res.model.eval()
    figs = retrieval_figures(model, tok, data["eval_x"], data["eval_caps"], rng=random.Random(0))
    figs.update({k2: v for k2, v in attribute_binding_by_kind(model, tok, data["eval_x"], data["eval_caps"]).items()
                 if not k2.endswith("_n")})
    figs["pick_accuracy_of_8"] = pick_accuracy(model, tok, data)
    figs["train_s"] = train_s
    figs["final_loss"] = res.final_loss
    log(f"{name} seed {seed}: " + ", ".join(f"{k2}={v:.3f}" for k2, v in figs.items()) + f" ({amp})")
    return {"figures": figs, "amp": amp, "negatives": k, "binding_share": share, "neg_dropout": neg_dropout,
            "mirrored_pairs": mirror,
            "config": {k2: v for k2, v in cfg.to_dict().items() if k2 in (*over, *overrides)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="small")
    ap.add_argument("--variants", default="old,new",
                    help=f"comma list of {', '.join(VARIANTS)}, or NAME:field=value/... (fields of "
                         f"RerankerConfig, k, share, drop; on top of NAME's part before '@' if it is one)")
    ap.add_argument("--seeds", default="0", help="comma list: one training run per seed and variant")
    ap.add_argument("--steps", type=int, default=None, help="default: the profile's total_steps")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or None)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="RerankerConfig override for every variant (e.g. lr=3e-3)")
    ap.add_argument("--cache", type=Path, default=None, help="rendered data (default: in the temp folder)")
    ap.add_argument("--bpe-dropout", type=float, default=None,
                    help="the tokenizer's BPE dropout of the training captions (default: the profile's text)")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    prof = get_profile(args.profile)
    base = prof.reranker
    steps = args.steps or base.total_steps
    overrides = parse_overrides(args.set, base)
    cache = args.cache or Path(tempfile.gettempdir()) / f"dalle-bench-reranker-{args.profile}.pt"
    data = build_data(args.profile, cache)
    t0 = time.time()
    text = prof.text if args.bpe_dropout is None else replace(prof.text, bpe_dropout=args.bpe_dropout)
    tok = train_bpe_tokenizer(data["train_caps"], text)
    log(f"tokenizer: {time.time() - t0:.1f}s")

    names = []
    for v in args.variants.split(","):
        v = v.strip()
        if ":" in v:  # NAME:field=value/field=value/... (k, share, drop: the negatives; else config)
            name, _, spec = v.partition(":")
            base_v = VARIANTS.get(name.split("@")[0], VARIANTS["old"])
            over, k, share, drop, mirror = dict(base_v[0]), base_v[1], base_v[2], base_v[3], base_v[4]
            for item in spec.split("/"):
                key, _, value = item.partition("=")
                if key == "k":
                    k = int(value)
                elif key == "share":
                    share = float(value)
                elif key == "drop":
                    drop = value in ("1", "true")
                elif key == "mirror":
                    mirror = int(value)
                elif key == "steps":
                    over["total_steps"] = int(value)
                else:
                    over.update(parse_overrides([item], base, "--variants"))
            VARIANTS[name] = (over, k, share, drop, mirror)
            names.append(name)
        elif v:
            names.append(v)
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}: choose from {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {}
    for name in names:
        runs = [run_variant(name, data, tok, base, seed, steps, overrides) for seed in seeds]
        keys = runs[0]["figures"].keys()
        mean = {k: float(np.mean([r["figures"][k] for r in runs])) for k in keys}
        results[name] = {**{k: v for k, v in runs[0].items() if k != "figures"}, "figures": mean,
                         "per_seed": [r["figures"] for r in runs]}
    out = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "processor": platform.processor() or platform.machine(), "torch": torch.__version__},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "profile": args.profile, "steps": steps, "batch_size": base.batch_size, "seeds": seeds,
        "overrides": overrides, "bpe_dropout": tok.config.bpe_dropout, "train_pairs": len(data["train_caps"]), "held_out_pairs": len(data["eval_caps"]),
        "variants": results,
    }
    if "old" in results:
        old = results["old"]["figures"]
        out["ratios_to_old"] = {n: {k: r["figures"][k] / old[k] for k in ("train_s", "attribute_binding",
                                                                           "pick_accuracy_of_8") if old[k]}
                                for n, r in results.items() if n != "old"}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
