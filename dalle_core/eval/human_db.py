"""Storage of a human-evaluation study: SQLite by default, Postgres by URL.

A vote is stored once per rater and item (UNIQUE(rater_id, item_id)): a
resubmission or a concurrent duplicate hits the constraint and changes nothing.
Raters are known by the SHA-256 of their token only; the token itself is never
stored or logged.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from sqlalchemy import (Boolean, CheckConstraint, DateTime, ForeignKey, Integer, String, Text,
                        UniqueConstraint, create_engine, event, func, select)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

ENV_DB = "DALLE_HUMAN_EVAL_DB"


def _now() -> datetime:
    return datetime.now(timezone.utc)


def hash_token(token: str) -> str:
    # tokens are 192-bit random strings, so a plain hash is enough (no password stretching)
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    model_a: Mapped[str] = mapped_column(String(200))
    model_b: Mapped[str] = mapped_column(String(200))
    raters_per_item: Mapped[int] = mapped_column(Integer, default=5)
    seed: Mapped[int] = mapped_column(Integer, default=0)
    image_root: Mapped[Optional[str]] = mapped_column(String(1000), nullable=True)  # what image keys are under
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    items: Mapped[list["Item"]] = relationship(back_populates="study", order_by="Item.position")


class Item(Base):
    """One caption with model A's and model B's image; `swapped` puts model B's on the left (shown as "A")."""

    __tablename__ = "items"
    __table_args__ = (UniqueConstraint("study_id", "position"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    caption: Mapped[str] = mapped_column(Text)
    image_model_a: Mapped[str] = mapped_column(String(1000))  # path/key under the app's image root
    image_model_b: Mapped[str] = mapped_column(String(1000))
    swapped: Mapped[bool] = mapped_column(Boolean, default=False)
    study: Mapped[Study] = relationship(back_populates="items")

    def shown(self, side: str) -> str:
        """The image key shown as side "A" (left) or "B" (right)."""
        left, right = ((self.image_model_b, self.image_model_a) if self.swapped
                       else (self.image_model_a, self.image_model_b))
        return left if side == "A" else right

    def to_model(self, answer: str) -> str:
        """A shown side ("A"/"B") as the model it shows ("A" = model A)."""
        return answer if not self.swapped else {"A": "B", "B": "A"}[answer]


class Rater(Base):
    __tablename__ = "raters"
    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)


class Assignment(Base):
    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("rater_id", "item_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    rater_id: Mapped[int] = mapped_column(ForeignKey("raters.id", ondelete="CASCADE"), index=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)  # the order this rater sees items in


class VoteRow(Base):
    """A rater's answers as shown on screen ("A" = left image); `Item.to_model` maps them to models."""

    __tablename__ = "votes"
    __table_args__ = (
        UniqueConstraint("rater_id", "item_id", name="uq_vote_rater_item"),
        CheckConstraint("realism IN ('A', 'B')", name="ck_vote_realism"),
        CheckConstraint("caption_match IN ('A', 'B')", name="ck_vote_caption_match"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    rater_id: Mapped[int] = mapped_column(ForeignKey("raters.id", ondelete="CASCADE"), index=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    realism: Mapped[str] = mapped_column(String(1))
    caption_match: Mapped[str] = mapped_column(String(1))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


def default_db_url(run_dir: str | Path) -> str:
    return f"sqlite:///{Path(run_dir).resolve() / 'human_eval.db'}"


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite files get WAL and a busy timeout so concurrent votes wait, not fail."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1] if "///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(conn, _record):
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    Base.metadata.create_all(engine)
    return engine


def sessions(url_or_engine) -> sessionmaker[Session]:
    engine = url_or_engine if isinstance(url_or_engine, Engine) else make_engine(url_or_engine)
    return sessionmaker(engine, expire_on_commit=False)


def get_study(session: Session, name: str | None = None) -> Study:
    """The named study, or the only/newest one; ValueError when there is none."""
    if name:
        study = session.scalar(select(Study).where(Study.name == name))
        if study is None:
            known = session.scalars(select(Study.name)).all()
            raise ValueError(f"no study named {name!r} in the database (known: {', '.join(known) or 'none'})")
        return study
    study = session.scalar(select(Study).order_by(Study.id.desc()))
    if study is None:
        raise ValueError("the database holds no study yet (create one with --items or --from-storage)")
    return study


def model_votes(session: Session, study_id: int) -> list[dict]:
    """Every vote of a study in model terms, for `dalle_core.eval.human.aggregate_votes`."""
    rows = session.execute(
        select(VoteRow, Item).join(Item, VoteRow.item_id == Item.id).where(Item.study_id == study_id)
    ).all()
    return [{"item": it.id, "rater": v.rater_id, "realism": it.to_model(v.realism),
             "caption_match": it.to_model(v.caption_match)} for v, it in rows]


def study_progress(session: Session, study: Study) -> dict:
    counts = session.execute(
        select(Item.id, func.count(VoteRow.id)).outerjoin(VoteRow, VoteRow.item_id == Item.id)
        .where(Item.study_id == study.id).group_by(Item.id)
    ).all()
    votes = sum(n for _, n in counts)
    return {"study": study.name, "items": len(counts),
            "items_complete": sum(1 for _, n in counts if n >= study.raters_per_item),
            "votes": votes, "votes_expected": len(counts) * study.raters_per_item}
