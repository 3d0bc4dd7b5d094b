"""Run the rl-trainer service: `python -m groundloop.rl_trainer`.

Consumes GenerationAdvanced, RunCompleted, PatchFailed and the search's end; emits
IdeaProposed (mode "rl") and PolicyUpdated (see service.py). Settings from GROUNDLOOP_*
variables. SIGTERM or Ctrl-C: stop fetching, finish the event in hand, exit; a SIGKILL
mid-update is safe too (the update is redone from the last published checkpoint).
"""

from __future__ import annotations

from groundloop.rl_trainer.service import role
from groundloop.skeleton import serve


def main() -> None:
    serve("rl-trainer", lambda _settings: role())


if __name__ == "__main__":
    main()
