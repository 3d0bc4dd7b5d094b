"""Run the ideator service: `python -m groundloop.ideator`.

Consumes GenerationAdvanced, emits IdeaProposed (see service.py). Settings from GROUNDLOOP_*
variables; model keys from OPENAI_API_KEY / ANTHROPIC_API_KEY (see groundloop.llm.client).
SIGTERM or Ctrl-C: stop fetching, finish the generation in hand, exit.
"""

from __future__ import annotations

from groundloop.ideator.service import role
from groundloop.llm.client import LLMSettings
from groundloop.skeleton import serve


def main() -> None:
    serve("ideator", lambda _settings: role(llm_settings=LLMSettings()))


if __name__ == "__main__":
    main()
