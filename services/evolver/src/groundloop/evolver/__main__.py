"""Run the evolver alone: `python -m groundloop.evolver` (needs GROUNDLOOP_NATS_URL).

Consumes SearchStarted, IdeaProposed, PatchReady/PatchFailed, RunRequested/RunStarted/
RunCompleted, GenerationAdvanced and SearchCompleted; emits RunRequested, GenerationAdvanced
and SearchCompleted (see service.py). SIGTERM or Ctrl-C stops it after the event in hand.
"""

from __future__ import annotations

from groundloop.evolver.service import role
from groundloop.skeleton import serve


def main() -> None:
    serve("evolver", lambda _settings: role())


if __name__ == "__main__":
    main()
