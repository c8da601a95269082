"""The reranker on the prior's own draws: how often its pick of N matches the caption.

`bench/reranker.py` scores the reranker on rendered near-misses; this scores it
where the platform uses it. From a finished demo run (its storage/: prior,
dVAE, tokenizer, coco_eval/), draw ``--draws`` candidates for each of
``--captions`` held-out captions with the run's prior (the profile's
temperature), judge every draw with the demo world's checker, and keep them
(``--out``/draws.npz; a rerun with the same arguments reuses them). Then train
the reranker once per ``--steps`` x ``--seeds`` (the profile's design, the
world's training pairs, batched as `bench/reranker.py` batches them) and report,
for the first 8 / 16 / ... / N draws, the share of captions whose reranked pick
matches; ``any`` is the oracle (some draw matches), ``first`` the prior alone.
``--images reconstructions`` trains on the dVAE's round trips of the training
images instead of the crawled ones (what a draw looks like).

    .venv/bin/python bench/rerank_draws.py --run-dir runs/d7 --steps 200 400 --seeds 0 1 --out /tmp/rd
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import reranker as rb  # noqa: E402  (bench/reranker.py: the world's pairs and their batches)
from zero_shot_curve import heldout_captions  # noqa: E402

from dalle_core.demo.checker import check_image  # noqa: E402
from dalle_core.dvae.model import decode_codes, encode_to_codes, load_dvae  # noqa: E402
from dalle_core.generation import TextToImage  # noqa: E402
from dalle_core.prior.model import load_prior  # noqa: E402
from dalle_core.profiles import get_profile  # noqa: E402
from dalle_core.rerank import train_reranker  # noqa: E402
from dalle_core.text.bpe import DalleTokenizer  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def draw(storage: Path, captions: list[str], n: int, temperature: float, path: Path) -> dict:
    """Candidates uint8 [C, n, H, W, 3] and the checker's verdicts bool [C, n], cached in `path`."""
    key = json.dumps({"captions": captions, "n": n, "temperature": temperature,
                      "prior_mtime": (storage / "prior/prior.pt").stat().st_mtime})
    if path.exists():
        d = np.load(path)
        if str(d["key"]) == key:
            log(f"draws: {path}")
            return {"cand": d["cand"], "ok": d["ok"]}
    _, decoder, _ = load_dvae(storage / "dvae/dvae.pt")
    chain = TextToImage(load_prior(storage / "prior/prior.pt"), decoder,
                        DalleTokenizer.load(storage / "tokenizer/bpe.json"))
    cands, oks, t0 = [], [], time.time()
    for c0 in range(0, len(captions), 25):
        chunk = captions[c0:c0 + 25]
        out = chain.generate(chunk, n=n, keep=1, seed=c0, temperature=temperature, rerank=False,
                             return_candidates=True)
        c = (out.candidates.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2).numpy()
        cands.append(c)
        oks.append(np.array([[check_image(Image.fromarray(img, "RGB"), cap).match for img in row]
                             for row, cap in zip(c, chunk)]))
        log(f"draws: {c0 + len(chunk)}/{len(captions)} captions, {time.time() - t0:.0f}s")
    d = {"cand": np.concatenate(cands), "ok": np.concatenate(oks)}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, key=np.array(key), **d)
    return d


def reconstructions(storage: Path, images: torch.Tensor) -> torch.Tensor:
    encoder, decoder, _ = load_dvae(storage / "dvae/dvae.pt")
    with torch.no_grad():
        return torch.cat([decode_codes(decoder, encode_to_codes(encoder, images[i:i + 128])).clamp(0, 1)
                          for i in range(0, len(images), 128)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--profile", default="small")
    ap.add_argument("--captions", type=int, default=200)
    ap.add_argument("--draws", type=int, default=32)
    ap.add_argument("--steps", type=int, nargs="+", default=None, help="reranker updates (default: the profile's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--images", choices=["crawled", "reconstructions"], default="crawled")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True, help="folder for the draws and the rendered pairs")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    storage = args.run_dir / "storage"
    prof = get_profile(args.profile)
    captions = heldout_captions(storage, args.captions)
    d = draw(storage, captions, args.draws, prof.sampling.temperature, args.out / "draws.npz")
    cand = torch.from_numpy(d["cand"]).permute(0, 1, 4, 2, 3).float() / 255
    ok = d["ok"]
    C, N = ok.shape
    data = rb.build_data(args.profile, args.out / "pairs.pt")
    if args.images == "reconstructions":
        data = {**data, "train_x": reconstructions(storage, data["train_x"])}
    tok = DalleTokenizer.load(storage / "tokenizer/bpe.json")  # the run's: the draws' captions are encoded so
    ks = [k for k in (8, 16, 32, 64, 128, 256, 512) if k <= N]
    results = []
    for steps in args.steps or [prof.reranker.total_steps]:
        for seed in args.seeds:
            cfg = prof.reranker.replace(seed=seed, total_steps=steps)
            t0 = time.time()
            with tempfile.TemporaryDirectory() as tmp:
                res = train_reranker(cfg, rb.batches_fn(data, tok, cfg, 0, 0.0, True, cfg.mirrored_pairs), tmp,
                                     total_steps=steps, resume=False, save_final=False, checkpoint_every=10 ** 9)
            train_s = time.time() - t0
            model = res.model.eval()
            with torch.no_grad():
                score = model.score(cand.flatten(0, 1), tok.encode_batch(captions).repeat_interleave(N, 0))
            score = score.view(C, N).numpy()
            row = {"steps": steps, "seed": seed, "train_s": round(train_s, 1),
                   "near_miss_pick_of_8": round(rb.pick_accuracy(model, tok, data), 3)}
            for k in ks:
                row[f"reranked_of_{k}"] = round(float(ok[np.arange(C), score[:, :k].argmax(1)].mean()), 3)
            log(json.dumps(row))
            results.append(row)
    print(json.dumps({
        "bench": "rerank_draws", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(args.run_dir), "profile": args.profile, "captions": C, "draws": N,
        "temperature": prof.sampling.temperature, "images": args.images, "threads": args.threads,
        "prior": {"first_draw": round(float(ok[:, 0].mean()), 3), "a_draw": round(float(ok.mean()), 3),
                  **{f"any_of_{k}": round(float(ok[:, :k].any(1).mean()), 3) for k in ks}},
        "rerankers": results,
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
