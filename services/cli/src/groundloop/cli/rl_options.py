"""`groundloop search --strategy rl|hybrid`: the RL settings from the command line.

`--rl-policy` names the policy (none: the offline knob language model; `hf:<path>`: a Hugging
Face causal LM from a local folder or the local cache, trained with LoRA). Every other field of
`RLSettings` is set with `--rl KEY=VALUE` (repeatable), checked against the model so a typo or a
value out of range exits 2 naming the valid keys, e.g.
`--rl novelty_bonus=0.2 --rl kl_coef=0.02 --rl warm_start_from=synthetic-evolution-s0`.
"""

from __future__ import annotations

import typer
from pydantic import ValidationError
from rich.console import Console

from groundloop import events as ev

console = Console()
RL_STRATEGIES = ("rl", "hybrid")


def rl_settings(strategy: str, policy: str | None, pairs: list[str] | None) -> ev.RLSettings | None:
    """RLSettings for an rl or hybrid search; refuses RL flags on any other strategy."""
    if strategy not in RL_STRATEGIES:
        if policy or pairs:
            console.print(
                f"[red]--rl-policy and --rl apply to --strategy rl or hybrid, not {strategy}[/]",
                highlight=False,
            )
            raise typer.Exit(2)
        return None
    values: dict[str, str | None] = {"policy": policy}
    fields = sorted(ev.RLSettings.model_fields)
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in ev.RLSettings.model_fields:
            console.print(
                f"[red]--rl {pair!r}: expected KEY=VALUE with KEY one of: {', '.join(fields)}[/]",
                highlight=False,
            )
            raise typer.Exit(2)
        values[key] = value.strip() or None
    try:
        return ev.RLSettings.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        console.print(f"[red]--rl: {problems}[/]", highlight=False)
        raise typer.Exit(2) from None
