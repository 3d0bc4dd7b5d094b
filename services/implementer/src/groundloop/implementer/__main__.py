"""Run the implementer service: `python -m groundloop.implementer [--require-full-isolation]`.

Consumes IdeaProposed, emits PatchReady or PatchFailed (see service.py). Settings from
GROUNDLOOP_* variables; model keys from OPENAI_API_KEY / ANTHROPIC_API_KEY (see groundloop.llm.client).
--require-full-isolation (or GROUNDLOOP_IMPLEMENTER_REQUIRE_FULL_ISOLATION=true): refuse to
start unless pre-flight smoke runs get every sandbox protection on this host.
SIGTERM or Ctrl-C: stop fetching, finish the idea in hand, exit.
"""

from __future__ import annotations

import argparse
import os

from groundloop.implementer.service import role
from groundloop.llm.client import LLMSettings
from groundloop.skeleton import serve

ISOLATION_VARIABLE = "GROUNDLOOP_IMPLEMENTER_REQUIRE_FULL_ISOLATION"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def _env_flag(name: str) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value not in _TRUE + _FALSE:
        raise SystemExit(f"{name}={os.environ[name]!r} is not a boolean: use true or false")
    return value in _TRUE


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m groundloop.implementer", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument(
        "--require-full-isolation",
        action="store_true",
        default=_env_flag(ISOLATION_VARIABLE),
        help="refuse to start unless every sandbox protection is in force for pre-flight "
        f"smoke runs on this host (default: ${ISOLATION_VARIABLE}, else false)",
    )
    args = parser.parse_args(argv)
    strict = bool(args.require_full_isolation)
    serve(
        "implementer",
        lambda _settings: role(llm_settings=LLMSettings(), require_full_isolation=strict),
    )


if __name__ == "__main__":
    main()
