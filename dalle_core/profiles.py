"""Run profiles: one config object per size, selectable everywhere.

`tiny` trains in seconds on CPU and is what the tests use; `small` is the
laptop demo; `paper-1.3B` and `paper-12B` are the paper's shapes. Only the
profile (and the resources) change between a laptop and a GPU cluster.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace


@dataclass(frozen=True)
class DataConfig:
    """The data stage: crawl, filters, shards (paper section 2.3 and appendix C)."""

    image_size: int  # side of the square images stored in shards (resize + centre crop)
    image_format: str = "png"  # "png" (lossless, demo) or "jpg"
    jpeg_quality: int = 95
    # filters
    min_caption_words: int = 3
    max_caption_chars: int = 400
    min_image_side: int = 32  # originals smaller than this on either side are dropped
    aspect_ratio_range: tuple[float, float] = (0.5, 2.0)  # the paper's [1/2, 2]
    english_min_confidence: float = 0.5  # normalised langid probability for "en"
    near_duplicate_max_distance: int = 6  # Hamming distance between 64-bit pHashes
    # data-quality gates on each crawl batch (dalle_core.data.expectations.batch_frame): bad data, not
    # filter bugs. A batch outside a bound is held back from the shards until fixed and re-filtered.
    # Web URL lists lose 20-50% to dead links (img2dataset's reports on CC3M/LAION); more is a broken list.
    max_crawl_failure_rate: float = 0.5
    min_kept_fraction: float = 0.3  # of the downloaded pairs, after every filter
    max_filter_drop_rate: float = 0.3  # each filter's share of the downloaded pairs...
    filter_drop_rate_bounds: tuple[tuple[str, float], ...] = ()  # ...unless bounded here: (("non_english", 0.6),)
    max_caption_words_drift: float = 0.3  # mean words per kept caption, relative to the earlier batches
    max_non_english_drift: float = 0.2  # share of non-English captions, absolute, vs the earlier batches
    # shards
    shard_size: int = 10_000  # samples per WebDataset shard (img2dataset's default)
    # crawler
    crawl_part_size: int = 10_000  # rows of a URL list crawled and written as one unit
    crawl_workers: int = 64
    crawl_timeout_s: float = 10.0
    crawl_retries: int = 2
    crawl_backoff_s: float = 0.5
    # crawler safety (dalle_core.data.net_guard): URL lists come from the open web, so by default
    # only globally routable addresses are fetched (checked after DNS, on every redirect hop); True
    # also allows loopback and private networks, for the demo world's server on 127.0.0.1
    allow_private_addresses: bool = False
    # images whose header declares more pixels are refused before decoding (`too_many_pixels`).
    # 4096^2 = 16.8 MP: one decoded copy is at most 64 MiB (4 bytes/pixel, RGBA / 32-bit modes;
    # 48 MiB as RGB) and decode + conversions hold ~3 at once: measured peak of one worker's
    # process_image at 4096^2, 193 MiB (RGBA PNG) / 130 MiB (RGB JPEG); Pillow's own bound
    # (178 MP, ~0.7 GiB a copy) would allow ~2 GiB per worker
    max_image_pixels: int = 4096 * 4096
    # the built-in demo world (only used when the crawl source is the demo world)
    demo_items_per_batch: int = 0
    demo_batches: int = 0
    demo_eval_items: int = 0
    demo_seed: int = 0


@dataclass(frozen=True)
class Profile:
    name: str
    data: DataConfig
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**asdict(self), "text": self.text.to_dict(), "dvae": self.dvae.to_dict()}

    @property
    def text(self):
        """The BPE tokenizer's config (vocab size, text positions) at this size."""
        from dalle_core.text.bpe import text_config

        return text_config(self.name)

    @property
    def dvae(self):
        """The dVAE's shape and training schedule at this size."""
        from dalle_core.dvae.config import get_dvae_config

        return get_dvae_config(self.name)

    def with_data(self, **changes) -> "Profile":
        return replace(self, data=replace(self.data, **changes))


PROFILES: dict[str, Profile] = {
    "tiny": Profile(
        name="tiny",
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
    ),
    "small": Profile(
        name="small",
        data=DataConfig(
            image_size=64,
            min_image_side=32,
            shard_size=500,
            crawl_part_size=500,
            crawl_workers=16,
            crawl_timeout_s=2.0,
            crawl_retries=2,
            crawl_backoff_s=0.1,
            allow_private_addresses=True,  # the demo world is served on 127.0.0.1
            max_image_pixels=1024 * 1024,  # 1 MP: <= 4 MiB a decoded copy; demo images are <= ~400x200
            demo_items_per_batch=1500,
            demo_batches=2,
            demo_eval_items=200,
        ),
    ),
    "paper-1.3B": Profile(
        name="paper-1.3B",
        data=DataConfig(image_size=256, image_format="jpg", min_image_side=64),
    ),
    "paper-12B": Profile(
        name="paper-12B",
        data=DataConfig(image_size=256, image_format="jpg", min_image_side=64),
    ),
}


class UnknownProfileError(ValueError):
    pass


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise UnknownProfileError(
            f"unknown profile {name!r}: choose one of {', '.join(PROFILES)}"
        ) from None
