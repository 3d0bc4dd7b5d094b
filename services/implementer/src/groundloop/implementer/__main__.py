"""Run the implementer service: `python -m groundloop.implementer`.

Consumes IdeaProposed, emits PatchReady or PatchFailed (see service.py). Settings from
GROUNDLOOP_* variables; model keys from OPENAI_API_KEY / ANTHROPIC_API_KEY (see groundloop.llm.client).
SIGTERM or Ctrl-C: stop fetching, finish the idea in hand, exit.
"""

from __future__ import annotations

from groundloop.implementer.service import role
from groundloop.llm.client import LLMSettings
from groundloop.skeleton import serve


def main() -> None:
    serve("implementer", lambda _settings: role(llm_settings=LLMSettings()))


if __name__ == "__main__":
    main()
