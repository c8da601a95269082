"""Creating a study: items (from a JSON file or the `samples` asset), rater tokens, assignments.

Each item goes to exactly `raters_per_item` distinct raters, balanced so that
every rater gets the same number of items give or take one; which model's image
is shown on the left is drawn per item from the study's seed and stored.
"""

from __future__ import annotations

import json
import os
import random
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dalle_core.eval.human_db import Assignment, Item, Rater, Study, hash_token

ENV_TOKENS = "DALLE_HUMAN_EVAL_TOKENS"
MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class ItemSpec:
    caption: str
    image_a: str  # model A's image: a path/key under the image root
    image_b: str


def load_items_file(path: str | Path) -> tuple[list[ItemSpec], dict]:
    """Items from JSON: a list of {"caption", "image_a", "image_b"}, or
    {"model_a": ..., "model_b": ..., "items": [...]}. Returns (items, model names found)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"items file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    names = {}
    if isinstance(data, dict):
        names = {k: data[k] for k in ("model_a", "model_b") if isinstance(data.get(k), str)}
        data = data.get("items")
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty list of items (or an object with 'items')")
    items = []
    for i, row in enumerate(data):
        missing = [k for k in ("caption", "image_a", "image_b") if not isinstance(row, dict) or not isinstance(row.get(k), str) or not row.get(k).strip()]
        if missing:
            raise ValueError(f"{path}: item {i}: missing or empty {', '.join(missing)}")
        items.append(ItemSpec(row["caption"].strip(), row["image_a"], row["image_b"]))
    return items, names


def items_from_samples(store, prefix: str = "samples", draw_b: Optional[int] = None) -> tuple[list[ItemSpec], dict]:
    """Items from the `samples` asset: per caption its best reranked image (draw 0) as model A,
    and as model B the first unreranked draw (`{prefix}/unreranked/NNN-00.png`) when the asset
    wrote it, else reranked draw `draw_b` (default: the last kept). Returns (items, model names)."""
    key = f"{prefix}/captions.json"
    if not store.exists(key):
        raise FileNotFoundError(f"{store.uri(key)} not found: materialize the `samples` asset first")
    rows = json.loads(store.get_text(key))
    keys = set(store.list(prefix))
    items, b_names = [], set()
    for row in rows:
        i = int(row["index"])
        a = f"{prefix}/{i:03d}-00.png"
        if a not in keys:
            raise FileNotFoundError(f"{store.uri(a)} not found (caption {i}: {row['caption']!r})")
        unranked = f"{prefix}/unreranked/{i:03d}-00.png"
        if draw_b is None and unranked in keys:
            b, b_names = unranked, b_names | {"unreranked"}
        else:
            k = draw_b if draw_b is not None else max(int(x[-6:-4]) for x in keys if x.startswith(f"{prefix}/{i:03d}-"))
            b = f"{prefix}/{i:03d}-{k:02d}.png"
            if k == 0 or b not in keys:
                raise ValueError(f"caption {i}: no image to compare draw 0 with ({b} missing or the same image); "
                                 "the samples asset needs keep >= 2, or unreranked draws")
            b_names |= {f"reranked-draw-{k}"}
        items.append(ItemSpec(row["caption"], a, b))
    if not items:
        raise ValueError(f"{store.uri(key)} lists no captions")
    names = {"model_a": "reranked", "model_b": "/".join(sorted(b_names))}
    if store.exists(f"{prefix}/models.json"):  # which registered versions made the images (the champions)
        made_by = json.loads(store.get_text(f"{prefix}/models.json")).get("described", "")
        names = {k: f"{v} ({made_by})"[:200] for k, v in names.items()} if made_by else names
    return items, names


def new_token() -> str:
    return secrets.token_urlsafe(24)


def tokens_from_env(n: int) -> Optional[list[str]]:
    """Tokens given in DALLE_HUMAN_EVAL_TOKENS (comma or whitespace separated), or None."""
    raw = os.environ.get(ENV_TOKENS, "")
    tokens = [t for t in raw.replace(",", " ").split() if t]
    if not tokens:
        return None
    if len(tokens) != n:
        raise ValueError(f"{ENV_TOKENS} holds {len(tokens)} tokens but {n} raters were asked for")
    return tokens


def check_tokens(tokens: Sequence[str]) -> None:
    if len(set(tokens)) != len(tokens):
        raise ValueError("rater tokens must be distinct")
    short = [i for i, t in enumerate(tokens) if len(t) < MIN_TOKEN_CHARS]
    if short:
        raise ValueError(f"rater token {short[0] + 1} is shorter than {MIN_TOKEN_CHARS} characters")


def write_tokens(path: str | Path, names: Sequence[str], tokens: Sequence[str]) -> Path:
    """Write 'name token' lines readable by the owner only (0600 from creation on)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as f:
        f.writelines(f"{n} {t}\n" for n, t in zip(names, tokens))
    return path


def assign(n_items: int, n_raters: int, k: int, rng: random.Random) -> list[list[int]]:
    """For each item, k distinct rater indices; every rater gets floor or ceil of n_items*k/n_raters."""
    if n_raters < k:
        raise ValueError(f"each item needs {k} distinct raters, but only {n_raters} raters were asked for")
    order = list(range(n_raters))
    rng.shuffle(order)
    # consecutive blocks of k around a circle: distinct within an item, balanced across raters
    return [[order[(i * k + j) % n_raters] for j in range(k)] for i in range(n_items)]


def check_images(items: Sequence[ItemSpec], image_root: str | Path) -> None:
    root = Path(image_root).resolve()
    for i, it in enumerate(items):
        for key in (it.image_a, it.image_b):
            p = (root / key).resolve()
            if root not in p.parents:
                raise ValueError(f"item {i}: image {key!r} lies outside the image root {root}")
            if not p.is_file():
                raise FileNotFoundError(f"item {i} ({it.caption!r}): image not found: {p}")


def create_study(
    factory: sessionmaker[Session], name: str, items: Sequence[ItemSpec], *, model_a: str, model_b: str,
    raters: int, raters_per_item: int = 5, seed: int = 0, tokens: Optional[Sequence[str]] = None,
    image_root: str | Path | None = None,
) -> tuple[int, list[tuple[str, str]]]:
    """Store a study; returns (study id, [(rater name, token)]). The tokens exist only in the return value."""
    if not items:
        raise ValueError("a study needs at least one item")
    if image_root is not None:
        check_images(items, image_root)
    tokens = list(tokens) if tokens is not None else [new_token() for _ in range(raters)]
    if len(tokens) != raters:
        raise ValueError(f"{len(tokens)} tokens given for {raters} raters")
    check_tokens(tokens)
    rng = random.Random(seed)
    names = [f"rater-{i + 1:02d}" for i in range(raters)]
    with factory.begin() as s:
        if s.scalar(select(Study.id).where(Study.name == name)) is not None:
            raise ValueError(f"a study named {name!r} already exists in the database (serve it without --items/--from-storage, or pick another --study)")
        taken = s.scalars(select(Rater.token_hash).where(Rater.token_hash.in_([hash_token(t) for t in tokens]))).all()
        if taken:
            raise ValueError("a rater token is already used by another study")
        study = Study(name=name, model_a=model_a, model_b=model_b, raters_per_item=raters_per_item, seed=seed,
                      image_root=str(Path(image_root).resolve()) if image_root is not None else None)
        s.add(study)
        s.flush()
        rows = [Item(study_id=study.id, position=i, caption=it.caption, image_model_a=it.image_a,
                     image_model_b=it.image_b, swapped=rng.random() < 0.5) for i, it in enumerate(items)]
        people = [Rater(study_id=study.id, name=n, token_hash=hash_token(t)) for n, t in zip(names, tokens)]
        s.add_all(rows + people)
        s.flush()
        per_rater: dict[int, list[int]] = {r: [] for r in range(raters)}
        for i, who in enumerate(assign(len(rows), raters, raters_per_item, rng)):
            for r in who:
                per_rater[r].append(rows[i].id)
        for r, item_ids in per_rater.items():
            rng.shuffle(item_ids)  # each rater sees items in an order of their own
            s.add_all(Assignment(rater_id=people[r].id, item_id=iid, position=p) for p, iid in enumerate(item_ids))
        study_id = study.id
    return study_id, list(zip(names, tokens))
