"""Run profiles: one config tree per size, defined once, selectable everywhere.

A `Profile` holds one config per stage, each the class that lives next to its
model:

    data            DataConfig           dalle_core/data/config.py
    text            TextConfig           dalle_core/text/bpe.py
    dvae            DVAEConfig           dalle_core/dvae/config.py
    prior           PriorConfig          dalle_core/prior/config.py   (the model's shape)
    prior_training  PriorTrainingConfig  dalle_core/prior/config.py   (optimiser, schedule, run)
    reranker        RerankerConfig       dalle_core/rerank/model.py
    sampling        SamplingConfig       dalle_core/prior/config.py   (how samples and the evaluation draw)

(the zero-shot report's other options are the asset's run config; a profile written
before `sampling` existed reads as the paper's sampling: temperature 1, no top-k.)

Each size is one builder function below, registered with `@profile_builder`;
adding a size (say `medium`) is one more decorated function in this file.
A builder names only the values it chooses; `build_profile` derives the values
that must agree across stages from one source each:

    dvae.image_size, reranker.image_size   <- data.image_size
    prior.image_grid                       <- dvae.grid_size
    prior.image_vocab_size                 <- dvae.vocab_size
    prior.text_len, reranker.text_len      <- text.text_len
    prior.text_vocab_size, reranker.text_vocab_size <- text.vocab_size
    prior_training.bpe_dropout             <- text.bpe_dropout

and `Profile` itself refuses a tree in which they disagree (one built by hand
or read from JSON). A builder that sets a derived value is an error.

`tiny` trains in seconds on CPU and is what the tests use; `small` is the
laptop demo; `paper-1.3B` and `paper-12B` are the paper's shapes. Only the
profile (and the resources) change between a laptop and a GPU cluster.

Launching the prior: `write_resolved_profile(profile, manifest, dest)` checks the
profile against the image-code manifest the data was coded with (grid, image
vocabulary, text positions, text ids) and writes the resolved tree as JSON; every
launcher (the `prior` asset, `dalle train-prior`, the SLURM script, the k8s Job)
hands that file to the trainer as `--profile-json`, and the trainer checks it
against the manifest again (`check_profile_against_codes`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from dalle_core.data.config import DataConfig
from dalle_core.dvae.config import DVAEConfig, _scaled
from dalle_core.prior.config import PriorConfig, PriorTrainingConfig, SamplingConfig
from dalle_core.rerank.model import RerankerConfig
from dalle_core.text.bpe import TextConfig

__all__ = [
    "CODE_SIZE_KEYS", "DataConfig", "PROFILE_BUILDERS", "Profile", "ProfileError", "ProfileMismatchError",
    "UnknownProfileError", "build_profile", "check_profile_against_codes", "code_sizes", "get_profile",
    "load_resolved_profile", "profile_builder", "profile_names", "read_code_manifest", "resolve_profile",
    "write_resolved_profile",
]

RESOLVED_FORMAT = "dalle-resolved-profile/1"


class UnknownProfileError(ValueError):
    pass


class ProfileError(ValueError):
    """A profile whose stages disagree, or a builder that sets a derived value."""


class ProfileMismatchError(ValueError):
    """The image codes were made with other sizes than the profile's."""


# which field of which stage is derived from which source (stage, field) -> (stage, field)
DERIVED: dict[tuple[str, str], tuple[str, str]] = {
    ("dvae", "image_size"): ("data", "image_size"),
    ("prior", "image_grid"): ("dvae", "grid_size"),
    ("prior", "image_vocab_size"): ("dvae", "vocab_size"),
    ("prior", "text_len"): ("text", "text_len"),
    ("prior", "text_vocab_size"): ("text", "vocab_size"),
    ("prior_training", "bpe_dropout"): ("text", "bpe_dropout"),
    ("reranker", "image_size"): ("data", "image_size"),
    ("reranker", "text_len"): ("text", "text_len"),
    ("reranker", "text_vocab_size"): ("text", "vocab_size"),
}

STAGES: dict[str, type] = {"data": DataConfig, "text": TextConfig, "dvae": DVAEConfig, "prior": PriorConfig,
                           "prior_training": PriorTrainingConfig, "reranker": RerankerConfig,
                           "sampling": SamplingConfig}
# stages a profile written before they existed may lack (they take their defaults: the paper's)
OPTIONAL_STAGES = ("sampling",)


@dataclass(frozen=True)
class Profile:
    name: str
    data: DataConfig
    text: TextConfig
    dvae: DVAEConfig
    prior: PriorConfig
    prior_training: PriorTrainingConfig
    reranker: RerankerConfig
    sampling: SamplingConfig = SamplingConfig()

    def __post_init__(self) -> None:
        for stage, cls in STAGES.items():
            if not isinstance(getattr(self, stage), cls):
                raise ProfileError(f"profile {self.name}: {stage} must be a {cls.__name__}, "
                                   f"got {type(getattr(self, stage)).__name__}")
        bad = [f"{stage}.{field} = {getattr(getattr(self, stage), field)!r} but "
               f"{src}.{src_field} = {getattr(getattr(self, src), src_field)!r}"
               for (stage, field), (src, src_field) in DERIVED.items()
               if getattr(getattr(self, stage), field) != getattr(getattr(self, src), src_field)]
        if bad:
            raise ProfileError(f"profile {self.name}: stages disagree: " + "; ".join(bad))
        if self.sampling.guidance_scale != 1.0 and self.prior_training.caption_dropout == 0.0:
            raise ProfileError(f"profile {self.name}: sampling.guidance_scale = {self.sampling.guidance_scale} "
                               f"needs a prior trained with empty captions (prior_training.caption_dropout > 0)")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **{stage: getattr(self, stage).to_dict() for stage in STAGES}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Profile":
        missing = [k for k in ("name", *STAGES) if k not in d and k not in OPTIONAL_STAGES]
        if missing:
            raise ProfileError(f"profile is missing {missing}")
        return cls(name=str(d["name"]), **{stage: STAGES[stage].from_dict(dict(d[stage])) for stage in STAGES
                                           if stage in d})

    def with_stage(self, stage: str, **changes) -> "Profile":
        """The same profile with other settings of one stage; the values derived from them
        follow (e.g. text.bpe_dropout -> prior_training.bpe_dropout)."""
        stages = {name: getattr(self, name) for name in STAGES}
        return _derive(self.name, {**stages, stage: replace(stages[stage], **changes)})

    def with_data(self, **changes) -> "Profile":
        """The same profile with other data settings; sizes derived from them follow."""
        return self.with_stage("data", **changes)


def _derive(name: str, stages: dict[str, Any]) -> Profile:
    """The profile of `stages` with every derived value set from its source (in dependency order)."""
    stages = dict(stages)
    for (stage, field), (src, src_field) in DERIVED.items():
        stages[stage] = replace(stages[stage], **{field: getattr(stages[src], src_field)})
    return Profile(name=name, **stages)


def build_profile(name: str, *, data: DataConfig, text: TextConfig, dvae: Mapping[str, Any] | DVAEConfig,
                  prior: Mapping[str, Any] | PriorConfig,
                  prior_training: Mapping[str, Any] | PriorTrainingConfig | None = None,
                  reranker: Mapping[str, Any] | RerankerConfig | None = None,
                  sampling: Mapping[str, Any] | SamplingConfig | None = None) -> Profile:
    """A consistent profile: the derived values (see the module docstring) come from
    their source. The dependent stages are given either as keyword dicts of the values
    the size chooses (the builders: a derived key there is an error) or as config
    objects (e.g. a test's own shape), whose derived values are overwritten."""
    def make(stage: str, spec: Any, base: dict[str, Any]):
        cls = STAGES[stage]
        if spec is None:
            spec = {}
        if isinstance(spec, cls):
            return replace(spec, **base)
        if not isinstance(spec, Mapping):
            raise ProfileError(f"profile {name}: {stage} must be a {cls.__name__} or a dict, got {type(spec).__name__}")
        derived = sorted(k for k in spec if (stage, k) in DERIVED)
        if derived:
            raise ProfileError(f"profile {name}: {stage}.{', '.join(derived)} is derived "
                               f"(from {', '.join('.'.join(DERIVED[stage, k]) for k in derived)}); do not set it")
        return cls(**{**spec, **base})

    dv = make("dvae", dvae, {"image_size": data.image_size})
    return Profile(
        name=name, data=data, text=text, dvae=dv,
        prior=make("prior", prior, {"image_grid": dv.grid_size, "image_vocab_size": dv.vocab_size,
                                    "text_len": text.text_len, "text_vocab_size": text.vocab_size}),
        prior_training=make("prior_training", prior_training, {"bpe_dropout": text.bpe_dropout}),
        reranker=make("reranker", reranker, {"image_size": data.image_size, "text_len": text.text_len,
                                             "text_vocab_size": text.vocab_size}),
        sampling=make("sampling", sampling, {}),
    )


# --- the sizes ------------------------------------------------------------------------------------

PROFILE_BUILDERS: dict[str, Callable[[], Profile]] = {}


def profile_builder(name: str) -> Callable[[Callable[[], Profile]], Callable[[], Profile]]:
    """Register the builder of the profile `name` (its order is `profile_names()`'s)."""
    def register(fn: Callable[[], Profile]) -> Callable[[], Profile]:
        if name in PROFILE_BUILDERS:
            raise ProfileError(f"profile {name!r} is defined twice")
        PROFILE_BUILDERS[name] = fn
        return fn
    return register


@profile_builder("tiny")
def tiny() -> Profile:
    """32x32 images -> 8x8 grid of 64 codes, 16 text positions: seconds on a CPU (tests)."""
    return build_profile(
        "tiny",
        data=DataConfig(
            image_size=32,
            min_image_side=24,
            shard_size=40,
            crawl_part_size=40,
            crawl_workers=8,
            crawl_timeout_s=1.0,
            crawl_retries=2,
            crawl_backoff_s=0.05,
            allow_private_addresses=True,  # the demo world is served on 127.0.0.1
            max_image_pixels=1024 * 1024,  # 1 MP: <= 4 MiB a decoded copy; demo images are <= ~400x200
            demo_items_per_batch=120,
            demo_batches=2,
            demo_eval_items=16,
        ),
        text=TextConfig(vocab_size=512, text_len=16),
        # A few seconds on a CPU. With a random codebook 60 updates end on 1-3 codes
        # (measured on the tiny demo world), which leaves the prior nothing to learn;
        # k-means + marginal KL: 13.
        dvae=dict(group_count=3, n_hid=16, n_blk_per_group=1, n_init=16, vocab_size=64,
                  lr=2e-3, lr_end=2e-4, kl_weight=1.0, ema_decay=0.9, batch_size=8,
                  codebook_init="kmeans", codebook_init_images=64, marginal_kl_weight=1.0,
                  log_every=10, checkpoint_every=50, **_scaled(60)),
        # 4 layers x 64 wide over 16 text + 8x8 image tokens; a 5x5 convolutional kernel
        # (11x11 would cover most of the 8x8 grid). Before issue 14 this prior was
        # written with 128 image codes against the dVAE's 64 (the prior asset resized it).
        prior=dict(n_layer=4, n_head=4, d_head=16, conv_kernel=5),
        prior_training=dict(lr=1e-3, warmup_steps=10, ema_decay=0.9, ema_every=1, amp_dtype="fp32",
                            batch_size=8, total_steps=60, log_every=10, checkpoint_every=20,
                            lr_plateau_window=10, lr_plateau_patience=2, lr_plateau_min_gap=20),
        # ~0.2M parameters, trains in seconds
        reranker=dict(total_steps=60, checkpoint_every=20),
    )


@profile_builder("small")
def small() -> Profile:
    """64x64 images -> 16x16 grid of 512 codes, 32 text positions: the laptop demo."""
    return build_profile(
        "small",
        data=DataConfig(
            image_size=64,
            min_image_side=32,
            shard_size=500,
            crawl_part_size=500,
            crawl_workers=16,
            # 2 s, not less: at 1 s the crawl saved ~9 s of the demo on the "slow" items (3 s,
            # a timeout either way) but 2 ordinary items timed out under the machine's load,
            # so what was crawled, and every model after it, depended on the load (2026-12-01).
            # (Those, and the ~15-50 lost at 2 s on a slow machine, were a batch's first
            # requests waiting for the server to build the world's items: it builds them
            # before serving since 2026-12-02, dalle_core/demo/server.py.)
            crawl_timeout_s=2.0,
            crawl_retries=2,
            crawl_backoff_s=0.1,
            allow_private_addresses=True,  # the demo world is served on 127.0.0.1
            max_image_pixels=1024 * 1024,  # 1 MP: <= 4 MiB a decoded copy; demo images are <= ~400x200
            demo_items_per_batch=1500,
            # 2 batches (~2,384 pairs, ~6 passes in the prior's 900 x 16), not medium's 4: on d9's dVAE
            # codes a held-out draw matched 0.070 / 0.101 / 0.091 on 1,000 / 2,384 / 4,768 pairs (any
            # of 8 0.39 / 0.505 / 0.50), and through the platform the 4-batch demo (`runs/d10`: its dVAE,
            # 900 steps on twice the images, recognised 0.925 of its reconstructions vs 0.975) reranked
            # 0.45 vs 0.49 for ~60 s more (docs/benchmarks.md, 2026-12-03, "Twice the pairs for small").
            demo_batches=2,
            demo_eval_items=200,
        ),
        # No BPE dropout (the paper's is 0.1, which the paper presets keep): the demo's captions come
        # from a small template grammar, and at 0.1 95% of them are split differently in training
        # than in sampling (~15 tokens instead of ~10), so the prior learns every word several ways.
        # Without it the small prior followed held-out captions ~1.5x sooner on the demo's codes
        # (any of 8 0.12 / 0.26 / 0.72 at 550 / 1,100 / 2,200 updates vs 0.03 / 0.16-0.20 / 0.43;
        # bench/zero_shot_curve.py --text-set bpe_dropout=0, 2026-12-01), and the reranker bound
        # better at its 200 updates (bench/reranker.py --bpe-dropout 0 vs 0.1, 3 seeds each; figures
        # in docs/benchmarks.md, "BPE dropout on the demo's captions").
        text=TextConfig(vocab_size=1024, text_len=32, bpe_dropout=0.0),
        # About 2.5 minutes on 2 CPU cores (~0.14 s a step in bf16). Three departures from the
        # paper, each measured on the demo world's 200 held-out images (share of
        # reconstructions its checker still recognises): at this length a random
        # codebook collapses to a dozen codes and objects lose their colours (0%);
        # the k-means init and the marginal KL keep colours (~77%); the learned-scale
        # logit-Laplace still lets edges go blocky (circles read as squares), which
        # the pixel MSE term fixes (weight 1000, i.e. sigma ~0.02: 96.5% at 900
        # steps; 88% at weight 100). The paper's beta = 6.6 confuses colours at this
        # length, hence beta = 1. Kept on the validation split (bench/tune_small.py,
        # 2026-11-30): weight 1000 98.5%, 300 97.5% at 900 steps.
        dvae=dict(group_count=3, n_hid=32, n_blk_per_group=1, n_init=64, vocab_size=512,
                  lr=5e-3, lr_end=2.5e-4, kl_weight=1.0, ema_decay=0.99, batch_size=16,
                  codebook_init="kmeans", codebook_init_images=256, marginal_kl_weight=1.0,
                  pixel_mse_weight=1000.0, log_every=25, checkpoint_every=100, **_scaled(900),
                  # fp32, although bf16 autocast (cpu_bf16=True) reconstructs as well (validation
                  # split, 2026-12-01: 98.5% recognised, recon MSE 0.00171 vs 0.00187) in 1.52x less
                  # time: its codes were harder for the prior. On the demo's data the bf16 dVAE's
                  # codes had perplexity 24.5 vs 18.3 (codebook usage 9.0% vs 6.4%), and the same
                  # prior (1,100 updates, 100 held-out captions x 8) matched any-of-8 0.06 / 0.11
                  # (block / SDPA attention) on them vs 0.16 / 0.20 on the fp32 dVAE's codes.
                  # A second seed of each (2026-12-01): bf16 0.14 vs fp32 0.30, lower again; the seed
                  # moves it as much as the precision (docs/benchmarks.md, "A second dVAE seed").
                  cpu_bf16=False),
        # 3 layers x 128 wide (~1.0M parameters with the embeddings and heads), sized so its
        # training fits the demo's 10-minute budget on 2 CPU cores (~0.12-0.13 s a bf16 step at
        # batch 16 since dalle_core/heap.py). Three layers still exercise every kind of the
        # pattern: row, column, conv.
        # 200 steps x 8 learned the code statistics but hardly the caption; 1,800 x 16 (~12 epochs
        # of the demo's shards) draws the captioned colours in most samples.
        # attention "auto": block-sparse on the CPU (dalle_core/prior/block_sparse.py): the same
        # outputs, and on the demo's codes 300 bf16 updates take 58 s vs 79 s with masked SDPA
        # (25.3k vs ~17-21k tokens/s), losses equal within 0.001 (2026-12-01, idle)
        # text_loss_weight 0.5 (the paper's is 1/8, which the paper presets keep): predicting the
        # caption's own tokens is an auxiliary task that makes the text positions encode the
        # caption, which the image positions then read. On the demo's codes at 1,100 updates
        # (200 held-out captions x 8 draws, seeds 0 / 1, 2026-12-02) any-of-8 went 0.195 / 0.265 at
        # 1/8 to 0.275 / 0.285 at 0.5 (0.28 at 1.0, 0.125 at 0), and with lr 2e-3 below to 0.40 /
        # 0.295 (a draw 0.062 / 0.053 vs 0.028 / 0.039): docs/benchmarks.md, "Learning rate and
        # text-loss weight".
        # 8 heads of 16 (the same width, parameters and step time as 4 of 32; the paper's heads are 64
        # wide): on `runs/d8`'s codes, 900 updates, seeds 0 / 1, 200 held-out captions x 8 draws at
        # temperature 1 (docs/benchmarks.md, 2026-12-03): a draw matched 0.113 / 0.128 vs 0.101 / 0.098,
        # any of 8 0.57 / 0.605 vs 0.505 / 0.53, the first draw 0.11 / 0.10 vs 0.075 / 0.10; 284 / 276 s
        # of training vs ~280. Through the demo (runs/d11 vs d9) it did not show: a draw 0.126 vs 0.122,
        # reranked 0.44 vs 0.49 (one run each, +-0.035). medium keeps 4 x 32 (its measured runs).
        # 3 layers (row, column, conv: the paper's pattern for 3), not 4, trained 4/3 as many
        # updates in the same time: on `runs/d15`'s codes with its reranker (the report's protocol,
        # 200 held-out captions x 16 draws at 0.7; 2026-12-03) 1,333 updates of 3 layers (235 s of
        # training) went reranked 0.735, first draw 0.235, any of 16 0.90, a draw 0.230, image loss
        # 0.747, against 1,000 of 4 layers (228 s): 0.63 / 0.185 / 0.82 / 0.160 / 0.818. At this
        # budget an update is worth more than a layer (six layers at equal time: worse still).
        prior=dict(n_layer=3, n_head=8, d_head=16, conv_kernel=7, attention="auto", text_loss_weight=0.5),
        # amp_dtype "auto": bf16 on a CPU with AVX-512 BF16 (1.29x the fp32 step; over 250
        # updates on the demo's codes the loss matches fp32 within 0.0005, 2026-12-01), fp32
        # elsewhere. 1,000 updates: what the 10-minute demo had room for beside the fp32 dVAE was
        # 900 (~0.19 s an update with block-sparse attention inside the demo, 2026-12-01); the
        # block-sparse gathers' faster backward (1.09-1.11x the bf16 step, bench/block_sparse_gather.py,
        # 2026-12-03) pays for about half of the 100 more: through the demo 1,000 updates took 305 s
        # (`runs/d14`) vs 287 s for 900 (`runs/d12`), both on the slow machine. Caption following is
        # on the steep part of its curve (docs/benchmarks.md): every update the budget allows pays.
        # d14's report: held-out reranked 0.63, first draw 0.185, any of 16 0.82, vs d12's 0.595 /
        # 0.17 / 0.755 (at 1,100 updates on d12's codes: 0.64 / 0.245 / 0.845). 1,333 since the
        # prior has 3 layers (above): the time of 4 layers' 1,000 updates. 1,800 since its steps
        # stopped faulting in fresh pages (dalle_core/heap.py: 1,333 updates took 163 s of the
        # demo instead of 240, `runs/d18` vs d17, the same model): through the demo (`runs/d19`,
        # 570 s in all, 2026-12-03) held-out first draw 0.33 (1,333: 0.235), reranked 0.715
        # (0.735), any of 16 0.93 (0.90), training captions first draw 0.438 (0.281).
        # lr 2e-3 (1e-3 before): without BPE dropout the higher rate is ahead at 1,100 updates
        # too (any-of-8 0.275 / 0.32 vs 0.195 / 0.265, seeds 0 / 1; 3e-3: 0.265), as it was past
        # 2,000 with dropout; medium, which had taken 2e-3 for that, now inherits it.
        # Muon on the resblocks' matrices at twice AdamW's rate (not the paper's AdamW:
        # dalle_core/muon.py). The small prior on the demo's codes (`runs/b0`), 900 updates,
        # 200 held-out captions x 8 draws at temperature 1 (docs/benchmarks.md, 2026-12-02): a
        # draw matched 0.044 with AdamW, 0.111 / 0.133 / 0.088 with Muon at 1x / 2x / 4x the
        # rate; any of 8 0.28 vs 0.545 / 0.58 / 0.50; first draw 0.025 vs 0.11-0.12; an update
        # costs 1.09-1.19x AdamW's (bench/prior.py --optimizers adamw muon).
        # lr_cooldown_steps 300 (not the paper's schedule): the rate falls linearly to 0 over the last
        # 300 updates (measured at 900), as Muon runs usually end. On `runs/d7`'s codes, 200 held-out
        # captions x 8 draws at temperature 1, seeds 0 / 1 (docs/benchmarks.md, 2026-12-03): a draw
        # matched 0.101 / 0.098 vs 0.086 / 0.081 without it, any of 8 0.505 / 0.53 vs 0.46 / 0.44,
        # training captions a draw 0.095 / 0.095 vs 0.088 / 0.085; the loss 0.943 vs 1.011. Free.
        prior_training=dict(lr=2e-3, warmup_steps=50, ema_decay=0.99, ema_every=1, amp_dtype="auto",
                            optimizer="muon", muon_lr_ratio=2.0, lr_cooldown_steps=300,
                            batch_size=16, total_steps=1800, log_every=50, checkpoint_every=300,
                            # the detector checks only in the last ~250 updates and needs a flat, confident fit
                            lr_plateau_window=50, lr_plateau_patience=3, lr_plateau_min_gap=200),
        # 400 updates, ~1.7 minutes on 2 CPU cores. The prior's draws (`runs/d7`'s prior, 200
        # held-out captions x 32 draws at temperature 0.7, the world's checker; 2026-12-03) show
        # what 200 updates (the demo until then) left: with 200 the reranked pick of 8 matched
        # 0.28 / 0.275 (seeds 0 / 1), of 32 0.36 / 0.295, with 400 0.42 / 0.34 and 0.57 / 0.48
        # (300: 0.355 and 0.475; 600: 0.385 and 0.565, seed 0), the true image among 8 near
        # misses 0.72 / 0.575 -> 0.99 / 0.835. Trained on the dVAE's reconstructions instead of
        # the crawled images (the draws' look) it picked as well as on the originals (0.295 vs
        # 0.28 of 8, 200 updates): not a domain gap. Binding
        # (issue 15, bench/reranker.py, 300 updates, 200 held-out compositions, 2026-12-01):
        # the first design (flattened image features, mean-pooled words, 3 swapped-word
        # negatives) scored the true caption above a swapped one 50% of the time (chance);
        # channel moments on the image side + a 5-word convolution on the text side + 64
        # mirror images a batch (no swapped-word negatives) 81.5%, and picked the true image
        # among 8 near-misses 36.5% vs 8.5%, in 141 s vs 202 s (bf16, 1 thread).
        reranker=dict(image_stem=16, image_widths=(32, 64, 64, 128), text_width=96, text_layers=2,
                      text_heads=4, embed_dim=96, batch_size=64, total_steps=400, log_every=25,
                      checkpoint_every=100, lr=2e-3, warmup_steps=20,
                      image_pool="moments", text_conv=5, hard_negatives=0, mirrored_pairs=64, amp_dtype="auto",
                      # Muon on the linears' matrices at twice the rate (not CLIP's AdamW: dalle_core/muon.py):
                      # bench/reranker.py, 200 updates, seeds 0 / 1, 2026-12-02: swap binding 0.895 / 0.825
                      # vs AdamW's 0.815 / 0.755, attribute binding 0.954 / 0.924 vs 0.828 / 0.807, the true
                      # image among 8 near-misses 0.72 / 0.575 vs 0.405 / 0.355 (Muon at 1x: 0.84 / 0.83,
                      # 0.943 / 0.901, 0.65 / 0.56)
                      optimizer="muon", muon_lr_ratio=2.0),
        # Draws at temperature 0.7 (the paper's 1), as medium does: on the 900-update prior of
        # `runs/d2` (this profile's lineage) with its reranker, 200 held-out captions x 8, a draw
        # matched 0.039 vs 0.0275 at 1.0, the reranked pick 0.12 vs 0.08 (training captions 0.14
        # vs 0.06); on a 2,200-update prior of these settings a draw 0.259 vs 0.215, the first
        # draw 0.26 vs 0.21 (reranked 0.345 vs 0.365). At the older 1,000-update prior, which had
        # not learnt the shapes, no temperature had mattered (docs/benchmarks.md, 2026-12-02).
        # The zero-shot report reranks 16 draws per caption (the paper 512: "gains level off past
        # 32"; medium 32). A draw matches as often either way; one of 16 matches far more often
        # than one of 8, and the reranker finds it: on the d11 / d9 chains (200 held-out captions,
        # the report's protocol, 2026-12-03) reranked 0.595 / 0.515 vs 0.44 / 0.495 at 8, any of
        # the draws 0.755 / 0.77 vs 0.525 / 0.575, for ~50 s more of the report on the slow machine
        # (106 vs 55 s of drawing). 200 more prior updates cost about as much and buy about as much
        # (d11's codes, 1,100 updates, 8 draws: reranked 0.555, first draw 0.165); both together at
        # 1,300 updates meet the figures (runs/d13: 0.70 / 0.295) at ~+95 s of the demo.
        sampling=dict(temperature=0.7, candidates=16),
    )


@profile_builder("medium")
def medium() -> Profile:
    """The small lineage run longer (about 21-25 minutes on 2 CPU cores): the same world,
    dVAE and shapes (but the prior's 128 width split 4 x 32, as measured here; small's is 8 x 16),
    twice the crawl (below), the prior trained 2.2x as long (2,200 updates, with small's Muon;
    4,400 with AdamW until 2026-12-03) and the reranker
    4.5x as long (900: swap binding 0.905, pick of 8 0.775 vs 0.88 / 0.725 at 600 updates,
    bench/reranker.py, 2026-12-01; at 600 the medium run's reranker picked a match for 41%
    of held-out captions where one of the 8 draws matched for 77%).
    The budget comes from the measured curve of caption following against prior updates
    (bench/zero_shot_curve.py on the demo's codes, bf16, 100 held-out captions x 8 draws,
    2026-12-01; docs/benchmarks.md): at lr 1e-3 any-of-8 went 0.20 / 0.43 / 0.71 after
    1100 / 2200 / 3300 updates, at lr 2e-3 0.09 / 0.59 / 0.73, so past the small budget
    the higher rate paid (first draw 0.18 vs 0.07 at 2200) and the curve still climbs at
    3300; shapes are what the prior learns last (20% of draws at 3300). Those curves had
    BPE dropout; without it (small's text, 2026-12-01) the medium run reranked 0.74 of 200
    held-out captions (0.63-0.685 with it), first draw 0.36, any of 32 1.00, in 25 min 41 s.
    Since 2026-12-02 small trains at lr 2e-3 too (ahead at 1,100 updates without BPE
    dropout), which medium inherits. It keeps the paper's text-loss weight 1/8, not small's
    0.5: the one medium run with 0.5 (`runs/m8`, 2026-12-02, its own crawl's codes) reranked
    0.62 of the held-out captions against 0.78 of training captions (first draw 0.17 vs
    0.25, any of 32 0.92 vs 0.97), a generalisation gap the 1/8 run (0.74 held-out vs 0.62
    training) did not have: at ~30 epochs of the demo's pairs, a heavier caption model
    seems to learn the training compositions rather than the words (one run each, on
    different codes: a hint, measured as such). With AdamW, more than 4,400 updates did not
    pay: the m7 prior resumed to 6,600 (~7 more minutes) raised a draw's match 0.353 -> 0.383
    and its reranked pick not at all (0.71 -> 0.72; docs/benchmarks.md, "Medium's prior
    trained 1.5x as long")."""
    p = small()
    return replace(p, name="medium",
                   # Twice small's crawl (4 batches of the same world: ~4,770 pairs), so that the prior's
                   # 4,400 AdamW updates (those measured here) saw each pair ~15 times instead of ~30
                   # (its 2,200 Muon updates now ~7.5 times). On the m7 run's dVAE and tokenizer, the
                   # same prior and seed trained on the 4-batch world's pairs (the platform's own crawl,
                   # filter, shards and image-code jobs) drew a held-out match 0.553 of the time against
                   # 0.353 on the 2-batch world's, its first draw 0.55 vs 0.385, and
                   # m7's reranker (trained on the 2 batches) picked a match for 0.83 vs 0.71 of 200
                   # held-out captions (32 draws at 0.7; validation 0.78 vs 0.73, a draw 0.544 vs 0.346):
                   # the largest gain measured for medium (docs/benchmarks.md, "Twice the pairs", 2026-12-02).
                   # Costs ~1 minute more of crawl, filters and encoding; the dVAE trains the same steps.
                   data=replace(p.data, demo_batches=4),
                   # 4 layers of 4 x 32 heads (small's 3 layers of 8 x 16: unmeasured here)
                   prior=p.prior.replace(text_loss_weight=1 / 8, n_layer=4, n_head=4, d_head=32),
                   # small's optimizer and schedule (Muon on the matrices at 2x, the rate cooling down
                   # over the last 300 updates) at half the updates AdamW had (4,400 in runs/m7-m10):
                   # through the platform (`runs/mm1`, 2026-12-03, slow machine) 2,200 Muon updates took
                   # 593 s vs m10's 1,086 s for 4,400 AdamW ones, and the report (200 held-out captions x
                   # 32 draws) went reranked 0.96 vs 0.94, first draw 0.785 vs 0.55, any of 32 1.00
                   # both; the whole run 1,486 s vs 2,178 s (docs/benchmarks.md, nineteenth session).
                   prior_training=replace(p.prior_training, total_steps=2200),
                   reranker=replace(p.reranker, total_steps=900, optimizer="adamw", muon_lr_ratio=1.0),
                   # Draws at temperature 0.7 (the paper's is 1): on the medium run's prior (4,400
                   # updates) and its 900-update reranker, 200 held-out captions x 8 draws, a draw
                   # matched 0.289 vs 0.227 at 1.0 (shapes 0.29 vs 0.23, colours 0.93 vs 0.88), the
                   # reranked pick 0.595 vs 0.525, the first draw 0.29 vs 0.23; the platform's own
                   # evaluation_job on a copy of that run (other seeds): a draw 0.273 vs 0.214,
                   # reranked 0.555 vs 0.54, first 0.26 vs 0.255, any of 8 0.81 vs 0.78. 0.5 gave
                   # little more, top-k 16 nothing (docs/benchmarks.md, 2026-12-01). small draws at
                   # 0.7 too since 2026-12-02 (measured on its own priors: small() above).
                   # 32 draws per caption for the zero-shot report (the paper reranks 512, "gains level
                   # off past 32"): from the same 32 draws of that prior at 0.7 for 200 held-out
                   # captions, its reranker picked a match for 0.605 / 0.685 / 0.715 of them among the
                   # first 8 / 16 / 32 (one of them matched for 0.805 / 0.95 / 0.995); the platform's
                   # evaluation_job on a copy of that run: reranked 0.685 at 32 vs 0.555 at 8 draws, any
                   # of N 0.995 vs 0.81; ~4x the sampling time of 8 (docs/benchmarks.md, 2026-12-01).
                   sampling=SamplingConfig(temperature=0.7, candidates=32))


def _paper(name: str, prior: dict[str, Any]) -> Profile:
    """The paper's data, text (16384 BPE ids + 256 pads), dVAE (256x256 -> 32x32 of 8192:
    DVAEConfig's defaults, with the paper's random crop on) and prior training (PriorTrainingConfig's defaults); `prior`
    is the transformer's shape."""
    return build_profile(
        name,
        data=DataConfig(image_size=256, image_format="jpg", min_image_side=64),
        text=TextConfig(vocab_size=16384, text_len=256),
        # the paper's sampling: temperature 1, the reranker's pick of 512 draws per caption
        sampling=SamplingConfig(candidates=512),
        # the paper's dVAE, with its training-time random crop + resize (Listing 1)
        dvae=dict(random_crop=True),
        prior=prior,
        # a CLIP-like stand-in for the pretrained CLIP the paper used
        reranker=dict(image_stem=64, image_widths=(64, 128, 256, 512, 512, 512), text_width=512,
                      text_layers=8, text_heads=8, embed_dim=512, batch_size=4096, total_steps=100_000,
                      lr=5e-4, warmup_steps=2000, log_every=100, checkpoint_every=2000),
    )


@profile_builder("paper-1.3B")
def paper_1_3b() -> Profile:
    """A smaller prior of the paper's design, for runs on a few nodes; the paper gives
    no shape for such a model. The 12B model's streams and vocabularies with a
    GPT-3-XL-like shape: 24 layers, 16 heads x 128 = 2048 wide, 4x MLP. Each layer has
    12 d^2 = 50.3M parameters (1.208B for 24 layers); embeddings and the two heads over
    the 16640 + 8192 classes add about 0.10B: 1.31B in total (count_parameters), the
    closest "round" shape to 1.3B with head size 128."""
    return _paper("paper-1.3B", dict(n_layer=24, n_head=16, d_head=128))


@profile_builder("paper-12B")
def paper_12b() -> Profile:
    """The paper's 12B prior: 64 layers, 62 heads x 64 = 3968 wide (PriorConfig's defaults)."""
    return _paper("paper-12B", {})


def profile_names() -> list[str]:
    return list(PROFILE_BUILDERS)


def get_profile(name: str) -> Profile:
    try:
        builder = PROFILE_BUILDERS[name]
    except (KeyError, TypeError):
        raise UnknownProfileError(
            f"unknown profile {name!r}: choose one of {', '.join(PROFILE_BUILDERS)}"
        ) from None
    return builder()


# --- the profile against the image codes: one launch path ----------------------------------------------

# the sizes an image-code manifest records (assets/dvae.py image_codes), and the profile's value of each
CODE_SIZE_KEYS = ("grid", "image_vocab", "text_len", "text_vocab")


def code_sizes(profile: Profile) -> dict[str, int]:
    """What the image codes of `profile` record: dVAE grid and vocabulary, text positions
    and text ids including the per-position pads (= the prior's shape)."""
    return {"grid": profile.prior.image_grid, "image_vocab": profile.prior.image_vocab_size,
            "text_len": profile.prior.text_len, "text_vocab": profile.prior.text_embedding_size}


def _manifest_extra(manifest: Any) -> dict[str, Any]:
    """The sizes' dict of a manifest given as a `dalle_core.data.codes.Manifest`, the
    manifest.json dict, or its "extra" dict."""
    extra = getattr(manifest, "extra", None)
    if extra is None and isinstance(manifest, Mapping):
        extra = manifest.get("extra", manifest)
    return dict(extra or {})


def check_profile_against_codes(profile: Profile, manifest: Any, source: str | Path | None = None) -> dict[str, int]:
    """Raise ProfileMismatchError, naming both values, unless the image codes were made
    with the profile's sizes; returns the sizes the manifest records (a manifest that
    records none, e.g. synthetic codes, is not checked)."""
    extra, want = _manifest_extra(manifest), code_sizes(profile)
    where = f"manifest {source}" if source else "the code manifest"
    have = {k: int(extra[k]) for k in CODE_SIZE_KEYS if extra.get(k) is not None}
    msgs = {
        "grid": lambda m, p: f"image codes use a {m}x{m} grid ({where}), profile {profile.name}'s prior expects {p}x{p}",
        "image_vocab": lambda m, p: f"image codes use a {m}-code vocabulary ({where}), "
                                    f"profile {profile.name}'s prior expects {p}",
        "text_len": lambda m, p: f"captions are coded to {m} text positions ({where}), "
                                 f"profile {profile.name}'s prior expects {p}",
        "text_vocab": lambda m, p: f"captions use {m} text ids including the per-position pads ({where}), "
                                   f"profile {profile.name}'s prior expects {p}",
    }
    bad = [msgs[k](have[k], want[k]) for k in CODE_SIZE_KEYS if k in have and have[k] != want[k]]
    if bad:
        raise ProfileMismatchError("; ".join(bad) + " (code the data with this profile, or train with the "
                                   "profile it was coded with)")
    return have


def resolve_profile(profile: Profile | str, manifest: Any, source: str | Path | None = None) -> Profile:
    """The profile (or profile name) a prior trains with on these image codes: checked
    against the sizes the codes were made with."""
    profile = get_profile(profile) if isinstance(profile, str) else profile
    check_profile_against_codes(profile, manifest, source)
    return profile


def write_resolved_profile(profile: Profile | str, manifest: Any, dest: str | Path,
                           source: str | Path | None = None) -> Path:
    """The one way a launcher hands the trainer its profile: resolve it against the
    image-code manifest and write it as JSON to `dest` (atomically; the trainer's
    `--profile-json`). Returns `dest`."""
    from dalle_core.io import atomic_write_text

    profile = resolve_profile(profile, manifest, source)
    extra = _manifest_extra(manifest)
    codes = {**{k: v for k, v in extra.items() if k in CODE_SIZE_KEYS or k.endswith("_sha256")},
             "manifest": str(source) if source else None}
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dest, json.dumps({"format": RESOLVED_FORMAT, "profile": profile.to_dict(), "codes": codes},
                                       indent=1, sort_keys=True) + "\n")
    return dest


def load_resolved_profile(path: str | Path) -> Profile:
    """The profile `write_resolved_profile` wrote."""
    d = json.loads(Path(path).read_text())
    if d.get("format") != RESOLVED_FORMAT:
        raise ProfileError(f"{path} is not a resolved profile (format {d.get('format')!r}, "
                           f"expected {RESOLVED_FORMAT!r})")
    return Profile.from_dict(d["profile"])


def read_code_manifest(codes: str | Path) -> tuple[dict[str, Any], Path]:
    """The image-code manifest (as a dict) of a codes folder, a storage root holding
    image_codes/, or the manifest file itself; and its path."""
    p = Path(codes)
    for candidate in (p, p / "manifest.json", p / "image_codes" / "manifest.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text()), candidate
    raise FileNotFoundError(f"no image-code manifest at {p}, {p / 'manifest.json'} or "
                            f"{p / 'image_codes' / 'manifest.json'}")
