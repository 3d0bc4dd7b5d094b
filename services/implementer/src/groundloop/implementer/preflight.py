"""Pre-flight: the checks a patched workspace passes before any runner spends a budget on it.

1. compile   — every changed Python file compiles (no files written, no bytecode left);
2. protected — protected files (and manifest.toml) are byte-identical to the environment's;
3. smoke     — the manifest's smoke command exits 0 within budget.smoke_seconds, run in the
               same sandbox as the runner's runs (groundloop.execution.sandbox.run_sandboxed
               with the run protocol's limits: bubblewrap namespaces, unprivileged uid,
               read-only filesystem but the workspace, resident memory from the manifest,
               allow-listed environment without keys, no network) with GROUNDLOOP_SMOKE=1,
               and leaves the protected files as they were. `limits` (e.g.
               require_full_isolation) is passed through; a passing check's detail
               names the sandbox it ran in. Skipped, and said so, when the manifest has
               `trusted_knobs = true` and the patch only sets declared knobs to values in
               their ranges (knob_only.py): the environment vouches that those run.
Checks stop at the first failure; each reports its seconds. The report's detail on a failure
is written for a model to act on (it is shown to the implementer's LLM when it revises).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from groundloop import telemetry
from groundloop.events import PreflightCheck, PreflightReport
from groundloop.execution.environment import Environment, PrepareFailed, ProtectedFileChanged
from groundloop.execution.run_protocol import protocol_limits
from groundloop.execution.sandbox import Limits, allowed_environment, run_sandboxed
from groundloop.implementer.knob_only import knob_only_change

TAIL_CHARS = 3000


def _command(command: list[str]) -> list[str]:
    """A leading "python" means this interpreter (as in the runner)."""
    return [sys.executable, *command[1:]] if command[0] == "python" else list(command)


def check_compiles(workspace: Path, files: list[str]) -> PreflightCheck:
    started = time.monotonic()
    compiled = 0
    for rel in files:
        path = workspace / rel
        if not rel.endswith(".py") or not path.is_file():
            continue
        try:
            compile(path.read_text(), rel, "exec", dont_inherit=True)
        except SyntaxError as exc:
            where = f"{rel}, line {exc.lineno}" if exc.lineno else rel
            line = f"\n    {exc.text.rstrip()}" if exc.text else ""
            return PreflightCheck(
                name="compile",
                ok=False,
                seconds=time.monotonic() - started,
                detail=f"{where}: {exc.msg}{line}",
            )
        except (UnicodeDecodeError, ValueError) as exc:
            return PreflightCheck(
                name="compile", ok=False, seconds=time.monotonic() - started, detail=f"{rel}: {exc}"
            )
        compiled += 1
    return PreflightCheck(
        name="compile",
        ok=True,
        detail=f"{compiled} Python file(s) compiled",
        seconds=time.monotonic() - started,
    )


def check_protected(env: Environment, workspace: Path, when: str = "") -> PreflightCheck:
    started = time.monotonic()
    try:
        env.verify_protected(workspace)
    except ProtectedFileChanged as exc:
        return PreflightCheck(
            name="protected", ok=False, detail=f"{exc}{when}", seconds=time.monotonic() - started
        )
    return PreflightCheck(
        name="protected",
        ok=True,
        detail=f"{len(env.protected_files)} files unchanged",
        seconds=time.monotonic() - started,
    )


def check_smoke(
    env: Environment,
    workspace: Path,
    *,
    scratch: Path,
    cache_dir: Path,
    seed: int,
    smoke_seconds: float | None = None,
    limits: Limits | None = None,
) -> PreflightCheck:
    manifest = env.manifest
    started = time.monotonic()
    if not manifest.smoke:
        return PreflightCheck(name="smoke", ok=True, detail="no smoke command declared; skipped")
    try:
        env.prepare(cache_dir)
    except PrepareFailed as exc:
        return PreflightCheck(
            name="smoke",
            ok=False,
            seconds=time.monotonic() - started,
            detail=f"the environment's prepare step failed (not the patch's fault): {exc}",
        )
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / "home").mkdir(exist_ok=True)
    budget = smoke_seconds or manifest.budget.smoke_seconds
    run_env = allowed_environment(
        {
            "GROUNDLOOP_SMOKE": "1",
            "GROUNDLOOP_SEED": str(seed),
            "GROUNDLOOP_DEVICE": "cpu",
            "GROUNDLOOP_SPLIT": manifest.metric.split,
            "GROUNDLOOP_CACHE_DIR": str(cache_dir.resolve()),
            "GROUNDLOOP_METRICS_OUT": str((scratch / "smoke-metrics.json").resolve()),
            "PYTHONHASHSEED": str(seed),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
        },
        scratch / "home",
    )
    result = run_sandboxed(
        _command(manifest.smoke),
        cwd=workspace,
        env=run_env,
        wall_seconds=budget,
        grace_seconds=min(manifest.budget.grace_seconds, 5.0),
        limits=protocol_limits(env, limits),
        log_path=scratch / "smoke.log",
    )
    seconds = time.monotonic() - started
    tail = result.output_tail[-TAIL_CHARS:]
    if result.status == "timed_out":
        return PreflightCheck(
            name="smoke",
            ok=False,
            seconds=seconds,
            detail=f"the smoke run ({' '.join(manifest.smoke)}) did not finish within "
            f"{budget:g} s; the change makes training too slow or hang.\n{tail}",
        )
    if result.status != "exited" or result.returncode != 0:
        how = result.isolation.get("limit_hit") or f"{result.status}, exit code {result.returncode}"
        return PreflightCheck(
            name="smoke",
            ok=False,
            seconds=seconds,
            detail=f"the smoke run ({' '.join(manifest.smoke)}) failed ({how}); "
            f"output tail:\n{tail}",
        )
    after = check_protected(env, workspace, when=" by the smoke run; code may never write there")
    if not after.ok:
        return PreflightCheck(name="smoke", ok=False, seconds=seconds, detail=after.detail)
    return PreflightCheck(
        name="smoke",
        ok=True,
        seconds=seconds,
        detail=f"{' '.join(manifest.smoke)} passed in {result.wall_seconds:.1f} s "
        f"(sandbox: {result.isolation.get('sandbox', 'unknown')})",
    )


def run_preflight(
    env: Environment,
    workspace: Path,
    files_changed: list[str],
    *,
    scratch: Path,
    cache_dir: Path,
    seed: int,
    smoke_seconds: float | None = None,
    limits: Limits | None = None,
) -> PreflightReport:
    with telemetry.step("pre-flight") as span:
        checks = [_traced(check_compiles(workspace, files_changed))]
        if checks[-1].ok:
            checks.append(_traced(check_protected(env, workspace)))
        trusted = trusted_knob_settings(env, workspace, files_changed) if checks[-1].ok else None
        if trusted is not None:
            settings = ", ".join(f"{name}={value}" for name, value in sorted(trusted.items()))
            checks.append(
                _traced(
                    PreflightCheck(
                        name="smoke",
                        ok=True,
                        detail=f"skipped: the patch only sets knobs within their declared "
                        f"ranges ({settings}), which the manifest trusts (trusted_knobs)",
                    )
                )
            )
        elif checks[-1].ok:
            checks.append(
                _traced(
                    check_smoke(
                        env,
                        workspace,
                        scratch=scratch,
                        cache_dir=cache_dir,
                        seed=seed,
                        smoke_seconds=smoke_seconds,
                        limits=limits,
                    )
                )
            )
        report = PreflightReport(passed=all(c.ok for c in checks), checks=checks)
        span.set_attribute("groundloop.passed", report.passed)
        return report


def trusted_knob_settings(
    env: Environment, workspace: Path, files_changed: list[str]
) -> dict[str, str] | None:
    """The knob settings of a patch that needs no smoke run (see knob_only.py), or None."""
    if not env.manifest.trusted_knobs or not files_changed:
        return None
    before, after = {}, {}
    for rel in files_changed:
        for side, path in ((before, env.root / rel), (after, workspace / rel)):
            try:
                side[rel] = path.read_text()
            except (OSError, UnicodeDecodeError):
                pass  # missing on one side: a new or deleted file, never knob-only
    return knob_only_change(env.manifest, before, after)


def _traced(check: PreflightCheck) -> PreflightCheck:
    """The check as a span of its own, timed by its own clock (it just ended)."""
    telemetry.finished_step(f"pre-flight {check.name}", check.seconds, passed=check.ok)
    return check


def failure_detail(report: PreflightReport) -> str:
    failed = next((c for c in report.checks if not c.ok), None)
    return f"pre-flight check '{failed.name}' failed: {failed.detail}" if failed else ""
