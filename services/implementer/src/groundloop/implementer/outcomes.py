"""The events an idea ends in at the implementer: PatchReady (the normalised diff inline, or
an object-store key when over the inline limit), PatchFailed (stage, last error, attempts,
usage), and SearchStopped for a model failure that every idea of the search would meet.
"""

from __future__ import annotations

import logging

from groundloop.bus import describe
from groundloop.events import (
    Event,
    IdeaProposed,
    ImplementerInfo,
    PatchFailed,
    PatchReady,
    SearchStopped,
    Usage,
    stable_id,
)
from groundloop.execution.environment import Environment
from groundloop.implementer.candidates import Candidate, ImplementerDeps
from groundloop.llm.client import LLMError, LLMUnreachable, ModelNotServed

# Logs under the service's name: one component to operators.
log = logging.getLogger("groundloop.implementer.service")
# Model failures every idea of the search would meet, and no earlier stage did (a timeout
# may be one long file; a missing key or a malformed name stop the search at the ideator).
STOPS_SEARCH: tuple[type[LLMError], ...] = (LLMUnreachable, ModelNotServed)


def patch_failed(
    event: IdeaProposed,
    deps: ImplementerDeps,
    stage: str,
    error: str,
    attempts: int,
    usage: Usage | None = None,
) -> PatchFailed:
    log.warning(
        "%s: patch failed at %s after %d attempt(s): %s",
        describe(event),
        stage,
        attempts,
        error.splitlines()[0][:300] if error else "",
    )
    return event.derive(
        PatchFailed,
        deps.producer,
        idea_id=event.idea_id,
        generation=event.generation,
        attempts=attempts,
        stage=stage,
        last_error=error[-8000:],
        usage=usage or Usage(),
    )


def search_stopped(event: IdeaProposed, deps: ImplementerDeps, exc: LLMError) -> SearchStopped:
    """SearchStopped for `exc`, one per search (a stable id: every idea meeting the same
    failure re-publishes the same event, and JetStream keeps one)."""
    return SearchStopped(
        event_id=stable_id("SearchStopped", event.search_id, deps.producer),
        search_id=event.search_id,
        causation_id=event.event_id,
        producer=deps.producer,
        stage="implementer",
        reason=str(exc) or type(exc).__name__,
        error_type=type(exc).__name__,
    )


def model_failed(event: IdeaProposed, deps: ImplementerDeps, exc: LLMError) -> list[Event]:
    """PatchFailed for a model error, and SearchStopped when no idea could do better."""
    failed: list[Event] = [patch_failed(event, deps, "model", str(exc), 0)]
    if isinstance(exc, STOPS_SEARCH):
        failed.append(search_stopped(event, deps, exc))
    return failed


def patch_ready(
    event: IdeaProposed,
    deps: ImplementerDeps,
    env: Environment,
    candidate: Candidate,
    attempts: int,
    implementer: ImplementerInfo,
    usage: Usage,
) -> PatchReady:
    patch_id = stable_id(event.idea_id, "patch")
    diff: str | None = candidate.diff
    diff_key = None
    if len(candidate.diff.encode()) > deps.inline_limit:
        if deps.put_artifact is None:
            raise RuntimeError("a diff over the inline limit needs an object store (put_artifact)")
        diff_key = deps.put_artifact(
            f"diffs/{event.search_id}/{patch_id}.diff", candidate.diff.encode()
        )
        diff = None
    m = env.manifest
    return event.derive(
        PatchReady,
        deps.producer,
        patch_id=patch_id,
        idea_id=event.idea_id,
        generation=event.generation,
        environment=env.name,
        environment_digest=env.digest(),
        resource_class=m.resource_class,
        diff=diff,
        diff_key=diff_key,
        diff_digest=candidate.made.diff_digest,
        patched_digest=candidate.made.patched_digest,
        files_changed=candidate.made.files_changed,
        attempts=attempts,
        implementer=implementer,
        usage=usage,
        preflight=candidate.report,
        seed=m.seeds[0] if m.seeds else 0,
    )
