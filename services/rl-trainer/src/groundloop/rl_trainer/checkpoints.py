"""Policy checkpoints and sampled groups in the JetStream object store.

A checkpoint's key names its search, version and digest (`rl/<search>/policy-v<k>-<sha16>`),
so two trainers that computed the same step never overwrite each other's bytes: the
PolicyUpdated that wins the once-per-step guard names the key and digest that belong to it,
and a loader checks the digest. A group's samples (the exact token ids the policy produced,
which GRPO needs and which re-tokenising the idea text would not reproduce) are stored under
`rl/<search>/group-<step>` before its ideas are published, so an update after a restart trains
on exactly what was sampled.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Protocol

from groundloop.rl_trainer.policy import Completion


class ArtifactStore(Protocol):
    async def put_artifact(self, key: str, data: bytes) -> str: ...
    async def get_artifact(self, key: str) -> bytes: ...


class CheckpointMismatch(RuntimeError):
    """The stored bytes do not have the digest the log recorded for them."""


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def checkpoint_key(search_id: str, version: int, sha: str) -> str:
    return f"rl/{search_id}/policy-v{version}-{sha[:16]}"


def initial_key(search_id: str) -> str:
    """Version 0 (the warmed-up initial policy): a function of the search's settings and seed,
    stored once so every replica and restart starts from the very same bytes."""
    return f"rl/{search_id}/policy-v0"


def group_key(search_id: str, step: int) -> str:
    return f"rl/{search_id}/group-{step}"


async def put_checkpoint(store: ArtifactStore, search_id: str, version: int, data: bytes):
    sha = digest(data)
    key = checkpoint_key(search_id, version, sha)
    await store.put_artifact(key, data)
    return key, sha


async def load_checkpoint(store: ArtifactStore, key: str, sha: str | None) -> bytes:
    data = await store.get_artifact(key)
    if sha is not None and digest(data) != sha:
        raise CheckpointMismatch(
            f"checkpoint {key} has digest {digest(data)[:16]}, the log says {sha[:16]}: "
            "the object store was changed behind the log; restore the bucket or fork the search"
        )
    return data


def encode_group(completions: list[Completion]) -> bytes:
    rows: list[dict[str, Any]] = [
        {"text": c.text, "prompt_ids": c.prompt_ids, "completion_ids": c.completion_ids}
        for c in completions
    ]
    return json.dumps(rows).encode()


def decode_group(data: bytes) -> list[Completion]:
    return [
        Completion(text=r["text"], prompt_ids=r["prompt_ids"], completion_ids=r["completion_ids"])
        for r in json.loads(data)
    ]
