"""Zero-shot evaluation speed at `small`: feature extraction images/s and the
end-to-end report time for N captions (generation with reranking + every metric).

The models are the small shapes, trained ones from a demo run directory when
given (``--run-dir runs/demo``), randomly initialised otherwise (speed does not
depend on the weights); captions and reference images come from the demo world.
The Inception extractor uses seeded random weights in torch-fidelity's
architecture (the real file cannot be downloaded here; same cost). Baseline in
the same run: the contrastive model's feature rate, against which the Inception
rate is given as a ratio.

    .venv/bin/python bench/eval.py --captions 1000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dalle_core.demo.captions import random_caption  # noqa: E402
from dalle_core.demo.render import render  # noqa: E402
from dalle_core.demo.scenes import random_scene  # noqa: E402
from dalle_core.dvae.evaluate import tensor_to_image  # noqa: E402
from dalle_core.dvae.model import build_dvae  # noqa: E402
from dalle_core.eval import FeatureCache, InceptionMetrics, zero_shot_metrics  # noqa: E402
from dalle_core.eval.images import map_batches  # noqa: E402
from dalle_core.eval.inception import write_random_weights  # noqa: E402
from dalle_core.generation import TextToImage  # noqa: E402
from dalle_core.prior import DalleTransformer  # noqa: E402
from dalle_core.profiles import get_profile  # noqa: E402
from dalle_core.rerank import ContrastiveReranker  # noqa: E402
from dalle_core.text.bpe import DalleTokenizer, train_bpe_tokenizer  # noqa: E402


def chain_from(run_dir: Path | None, captions: list[str]) -> tuple[TextToImage, str]:
    if run_dir is not None and (run_dir / "storage/prior/prior.pt").exists():
        from dalle_core.dvae.model import load_dvae
        from dalle_core.prior.model import load_prior
        from dalle_core.rerank import load_reranker

        st = run_dir / "storage"
        _, decoder, _ = load_dvae(st / "dvae/dvae.pt")
        return TextToImage(load_prior(st / "prior/prior.pt"), decoder, DalleTokenizer.load(st / "tokenizer/bpe.json"),
                           reranker=load_reranker(st / "reranker/reranker.pt")), f"trained ({run_dir})"
    small = get_profile("small")
    tok = train_bpe_tokenizer(captions, small.text)
    torch.manual_seed(0)
    prior = DalleTransformer(small.prior)
    _, decoder = build_dvae(small.dvae)
    rr = ContrastiveReranker(small.reranker)
    return TextToImage(prior, decoder, tok, reranker=rr), "random init (small shapes)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--captions", type=int, default=1000)
    ap.add_argument("--candidates", type=int, default=1, help="samples per caption (reranked to 1)")
    ap.add_argument("--run-dir", type=Path, default=None)
    ap.add_argument("--feature-images", type=int, default=256, help="images for the feature-rate figures")
    ap.add_argument("--no-inception", action="store_true",
                    help="end to end without FID/IS (Inception on a CPU takes ~1 s an image)")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    scenes = [random_scene(rng, held_out=True) for _ in range(args.captions)]
    captions = [random_caption(s, rng) for s in scenes]
    references = [render(s, 64, 64, rng) for s in scenes]
    chain, models = chain_from(args.run_dir, captions)
    with tempfile.TemporaryDirectory() as tmp:
        inception = InceptionMetrics.from_weights(write_random_weights(Path(tmp) / "inc.pth"), device="cpu")

        imgs = references[: args.feature_images]
        t = time.perf_counter()
        map_batches(lambda x: chain.reranker.image_features(x.float() / 255.0), imgs, batch_size=64)
        contrastive_rate = len(imgs) / (time.perf_counter() - t)
        t = time.perf_counter()
        inception.features(imgs)
        inception_rate = len(imgs) / (time.perf_counter() - t)

        t0 = time.perf_counter()
        generated = []
        for s in range(0, len(captions), 32):
            out = chain.generate(captions[s:s + 32], n=args.candidates, keep=1, seed=s, batch_size=256)
            generated += [tensor_to_image(x) for x in out.images[:, 0]]
        t_gen = time.perf_counter() - t0
        t1 = time.perf_counter()
        metrics = zero_shot_metrics(generated, references, chain.reranker.image_features,
                                    inception=None if args.no_inception else inception,
                                    radii=(0, 1, 2, 4, 8), cache=FeatureCache(Path(tmp) / "cache"))
        t_metrics = time.perf_counter() - t1
    print(json.dumps({
        "bench": "eval", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(), "models": models, "captions": args.captions,
        "candidates_per_caption": args.candidates,
        "contrastive_features_images_per_s": round(contrastive_rate, 1),
        "inception_features_images_per_s": round(inception_rate, 2),
        "inception_over_contrastive": round(inception_rate / contrastive_rate, 4),
        "generation_s": round(t_gen, 1), "metrics_s": round(t_metrics, 1),
        "report_total_s": round(t_gen + t_metrics, 1),
        "fid": round(metrics.get("fid", float("nan")), 3), "contrastive_fd": round(metrics["contrastive_fd"], 4),
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
