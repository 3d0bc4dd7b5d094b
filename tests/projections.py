"""Projection databases for the projector's tests: an empty one, and events folded into it
one per delivery, as the live projector does."""

from __future__ import annotations

from sqlmodel import Session

from groundloop.api.projector import apply
from groundloop.api.store import make_engine, reset_tables
from tests.search_story import search_story

# Two searches' logs, interleaved by nothing: every event type the projector folds.
STORY = search_story("s1") + search_story("s2", generations=2, ideas_per_generation=8, seed=3)


def fresh_engine(url: str = "sqlite://"):
    engine = make_engine(url)
    reset_tables(engine)
    return engine


def apply_each(engine, events) -> list[bool]:
    with Session(engine) as session:
        return [apply(session, e) for e in events]
