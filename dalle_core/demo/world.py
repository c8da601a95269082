"""The demo world: a small synthetic web that stands in for the paper's crawl.

Every image shows two coloured shapes on a muted background, and its caption
says what they are and where ("a small red circle to the left of a large blue
square"). Because the world is known, three things the real web cannot give
come for free:

- `expected`: for every crawled item, what a correct crawler and filter chain
  must do with it (keep it, or which stage drops it);
- held-out compositions: ~10% of (colour, shape, relation, colour, shape)
  arrangements never appear in training; the evaluation set (MS-COCO captions
  format) uses only them, so sampling from its captions is truly zero-shot;
- validation compositions: another ~5%, in neither the crawl nor the
  evaluation set, for tuning presets (`validation_items`, `write_validation_set`)
  without looking at the figures that reports and promotion use;
- `checker.check_image`: a programmatic judge of whether an image shows what a caption
  says, used to score dVAE reconstructions and generated samples.

Everything is a pure function of the seed; image bytes are rendered on demand.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np

from .captions import SHORT_CAPTIONS, date_caption, foreign_caption, random_caption
from .items import DUPLICATE_FAULTS, FAULT_EXPECTED, FAULTS, EvalItem, WorldItem
from .scenes import random_scene


class DemoWorld:
    """A deterministic synthetic crawl: `n_batches` URL lists of `items_per_batch`
    items each, with faults mixed in, plus `n_eval` held-out evaluation images."""

    def __init__(self, seed: int = 0, items_per_batch: int = 120, n_batches: int = 2,
                 n_eval: int = 16, fault_rate: float = 0.015):
        self.seed, self.items_per_batch, self.n_batches, self.n_eval = seed, items_per_batch, n_batches, n_eval
        self.fault_rate = fault_rate
        self._batches: dict[int, list[WorldItem]] = {}
        self._eval: list[EvalItem] | None = None
        # Items are built lazily, and the server asks from many threads at once:
        # one builds, the rest wait (re-entrant: a batch's plants need eval_items).
        self._build_lock = threading.RLock()

    @classmethod
    def from_data_config(cls, data) -> "DemoWorld":
        """The world a profile's `DataConfig` describes (demo_* fields)."""
        return cls(data.demo_seed, data.demo_items_per_batch, data.demo_batches, data.demo_eval_items)

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *keys])

    # -- faults -------------------------------------------------------------

    def fault_count(self, fault: str) -> int:
        """Items with `fault` in each batch: a few percent, at least 2 when the
        batch has room for every fault (>= 60 items)."""
        n = self.items_per_batch
        count = max(2, round(self.fault_rate * n))
        count = min(count, (n // 2) // len(FAULTS))  # at least half of a batch is clean
        if fault == "eval_plant":  # each evaluation image is planted at most once
            count = min(count, self.n_eval // max(1, self.n_batches))
        return count

    def _fault_plan(self, batch: int) -> list[str | None]:
        n = self.items_per_batch
        rng = self._rng(1, batch)
        plan: list[str | None] = [None] * n
        # duplicates go in the second half, so that their originals come first
        late = [int(p) for p in rng.permutation(np.arange(n // 2, n))]
        for p, fault in zip(late, [f for f in DUPLICATE_FAULTS for _ in range(self.fault_count(f))]):
            plan[p] = fault
        free = [int(p) for p in rng.permutation(n) if plan[p] is None]
        others = [f for f in FAULTS if f not in DUPLICATE_FAULTS for _ in range(self.fault_count(f))]
        for p, fault in zip(free, others):
            plan[p] = fault
        return plan

    # -- items --------------------------------------------------------------

    def batch_items(self, batch: int) -> list[WorldItem]:
        if not 0 <= batch < self.n_batches:
            raise IndexError(f"batch {batch} out of range (the world has {self.n_batches})")
        if batch not in self._batches:
            with self._build_lock:
                if batch not in self._batches:
                    self._batches[batch] = self._make_batch(batch)
        return self._batches[batch]

    def _make_batch(self, batch: int) -> list[WorldItem]:
        plan = self._fault_plan(batch)
        plants = iter(range(batch * self.fault_count("eval_plant"), self.n_eval))
        items: list[WorldItem] = []
        for index, fault in enumerate(plan):
            rng = self._rng(2, batch, index)
            scene = random_scene(rng, held_out=False)
            w = int(rng.integers(96, 193))
            h = int(np.clip(round(w / rng.uniform(0.88, 1.12)), 96, 192))
            item = dict(key=f"b{batch:03d}-{index:06d}", caption=random_caption(scene, rng), fault=fault,
                        expected=FAULT_EXPECTED.get(fault, "keep"), scene=scene,
                        seed=int(rng.integers(2**63)), width=w, height=h,
                        image_format=("png", "jpeg")[rng.integers(2)])
            if fault == "non_english":
                item["caption"] = foreign_caption(scene, rng)
            elif fault == "date_caption":
                item["caption"] = date_caption(rng)
            elif fault == "short_caption":
                item["caption"] = SHORT_CAPTIONS[rng.integers(len(SHORT_CAPTIONS))]
            elif fault == "extreme_aspect":  # ratio 2.5..4, shorter side >= 64
                short, ratio = int(rng.integers(64, 97)), rng.uniform(2.5, 4.0)
                long = int(round(short * ratio))
                item["width"], item["height"] = (long, short) if rng.integers(2) else (short, long)
            elif fault == "tiny_image":
                item["width"] = item["height"] = int(rng.integers(12, 21))
            elif fault in DUPLICATE_FAULTS:
                originals = [i for i in items if i.fault is None]
                if not originals:  # only in batches too small to have faults of every kind
                    item.update(fault=None, expected="keep")
                    items.append(WorldItem(**item))
                    continue
                source = originals[rng.integers(len(originals))]
                item.update(caption=source.caption, scene=source.scene, source=source,
                            width=source.width, height=source.height,
                            image_format=source.image_format if fault == "exact_duplicate" else "jpeg")
            elif fault == "eval_plant":
                source = self.eval_items()[next(plants)]
                item.update(caption=source.caption, scene=source.scene, source=source,
                            width=source.width, height=source.height, image_format="jpeg")
            items.append(WorldItem(**item))
        return items

    def item(self, key: str) -> WorldItem:
        """The item behind a URL key; KeyError for a key the world does not have."""
        m = re.fullmatch(r"b(\d{3})-(\d{6})", key)
        if m is None:
            raise KeyError(key)
        batch, index = int(m.group(1)), int(m.group(2))
        if batch >= self.n_batches or index >= self.items_per_batch:
            raise KeyError(key)
        return self.batch_items(batch)[index]

    def all_items(self) -> Iterator[WorldItem]:
        for batch in range(self.n_batches):
            yield from self.batch_items(batch)

    def expected_counts(self) -> Counter:
        """How many items a correct pipeline keeps, and drops at each stage."""
        return Counter(item.expected for item in self.all_items())

    def eval_items(self) -> list[EvalItem]:
        with self._build_lock:
            if self._eval is None:
                items = []
                for i in range(self.n_eval):
                    rng = self._rng(3, i)
                    scene = random_scene(rng, held_out=True)
                    items.append(EvalItem(i + 1, f"eval-{i + 1:06d}", scene, random_caption(scene, rng),
                                          int(rng.integers(2**63))))
                self._eval = items
        return self._eval

    def build(self) -> "DemoWorld":
        """Build every batch's and the evaluation set's items now (not rendering
        their images), so that no request waits for it; returns the world."""
        for batch in range(self.n_batches):
            self.batch_items(batch)
        self.eval_items()
        return self

    def validation_items(self, n: int | None = None) -> list[EvalItem]:
        """`n` images (default: as many as the evaluation set) of validation
        compositions, for tuning: disjoint from the crawl and from `eval_items`."""
        items = []
        for i in range(self.n_eval if n is None else n):
            rng = self._rng(4, i)
            scene = random_scene(rng, split="validation")
            items.append(EvalItem(i + 1, f"val-{i + 1:06d}", scene, random_caption(scene, rng),
                                  int(rng.integers(2**63))))
        return items

    # -- files --------------------------------------------------------------

    def write_eval_set(self, out_dir: str | Path) -> Path:
        """The evaluation set as MS-COCO captions: out_dir/captions.json and
        out_dir/images/<file_name>. Returns the JSON's path."""
        return self._write_coco(self.eval_items(), out_dir,
                                "demo world zero-shot evaluation set (held-out compositions)")

    def write_validation_set(self, out_dir: str | Path, n: int | None = None) -> Path:
        """`validation_items(n)` as MS-COCO captions, laid out as `write_eval_set`
        lays out the evaluation set. Returns the JSON's path."""
        return self._write_coco(self.validation_items(n), out_dir,
                                "demo world validation set (compositions in neither training nor evaluation)")

    def _write_coco(self, items: list[EvalItem], out_dir: str | Path, description: str) -> Path:
        from ..data.coco import CocoImage, write_coco_captions

        out_dir = Path(out_dir)
        (out_dir / "images").mkdir(parents=True, exist_ok=True)
        images = []
        for item in items:
            (out_dir / "images" / item.file_name).write_bytes(item.image_bytes())
            images.append(CocoImage(item.image_id, item.file_name, item.width, item.height, [item.caption]))
        info = {"description": description, "seed": self.seed, "n_images": len(items)}
        return write_coco_captions(images, out_dir / "captions.json", info=info)

    def write_url_lists(self, out_dir: str | Path, base_url: str) -> list[Path]:
        """One img2dataset-style URL list per batch (columns url, caption), in
        turn parquet, csv and tsv."""
        import pandas as pd

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        base_url = base_url.rstrip("/")
        paths = []
        for batch in range(self.n_batches):
            items = self.batch_items(batch)
            frame = pd.DataFrame({"url": [f"{base_url}/img/{i.key}" for i in items],
                                  "caption": [i.caption for i in items]})
            fmt = ("parquet", "csv", "tsv")[batch % 3]
            path = out_dir / f"batch-{batch:03d}.{fmt}"
            if fmt == "parquet":
                frame.to_parquet(path, index=False)
            else:
                frame.to_csv(path, index=False, sep="," if fmt == "csv" else "\t")
            paths.append(path)
        return paths

    def write_broken_url_list(self, out_dir: str | Path, base_url: str, name: str = "broken-links.csv",
                              dead_fraction: float = 0.8) -> Path:
        """Bad *data* of the kind a real inbox receives: a URL list whose links are mostly dead
        (an expired list: 404 for `dead_fraction` of the rows; the rest re-list batch 0's images).
        Every row is a valid URL with an English caption, so no filter rejects it; only the
        crawl-batch quality suite (failure-rate bound) holds it back from the shards."""
        import pandas as pd

        n = max(20, self.items_per_batch // 4)
        rng = self._rng(5)
        live = [i for i in self.batch_items(0) if i.expected == "keep"]
        base_url = base_url.rstrip("/")
        urls, captions = [], []
        for row in range(n):
            if rng.random() < dead_fraction:  # a key the world does not have: the server answers 404
                urls.append(f"{base_url}/img/b999-{row:06d}")
                captions.append(random_caption(random_scene(rng), rng))
            else:
                item = live[int(rng.integers(len(live)))]
                urls.append(f"{base_url}/img/{item.key}")
                captions.append(item.caption)
        path = Path(out_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"url": urls, "caption": captions}).to_csv(path, index=False)
        return path
