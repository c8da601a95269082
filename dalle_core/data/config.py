"""The data stage's configuration: crawl, filters, shards, data-quality gates.

One `DataConfig` per profile (dalle_core.profiles builds them); the data
image size is the single source of the dVAE's and the reranker's image size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace


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

    def replace(self, **changes) -> "DataConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        """From `to_dict` output (or its JSON round trip: lists back to tuples)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DataConfig fields: {unknown}")
        kw = dict(d)
        if "aspect_ratio_range" in kw:
            kw["aspect_ratio_range"] = tuple(kw["aspect_ratio_range"])
        if "filter_drop_rate_bounds" in kw:
            kw["filter_drop_rate_bounds"] = tuple((str(k), float(v)) for k, v in kw["filter_drop_rate_bounds"])
        return cls(**kw)
