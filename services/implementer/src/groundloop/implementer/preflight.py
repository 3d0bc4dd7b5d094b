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

`run_preflight` checks a materialised workspace. `preflight_from_texts` is the same report for
a patch that needs no smoke run, from the changed files' texts alone (no workspace); it
declines (None) any other patch.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Mapping
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
    return _compiles(
        (rel, (workspace / rel).read_text)
        for rel in files
        if rel.endswith(".py") and (workspace / rel).is_file()
    )


def check_compiles_texts(texts: Mapping[str, str]) -> PreflightCheck:
    """check_compiles of files given as path -> text (as a workspace would hold them)."""
    return _compiles(
        (rel, lambda text=texts[rel]: text) for rel in sorted(texts) if rel.endswith(".py")
    )


def _compiles(sources: Iterable[tuple[str, Callable[[], str]]]) -> PreflightCheck:
    """Compile each Python file (path, how to read it), stopping at the first that fails."""
    started = time.monotonic()
    compiled = 0
    for rel, read in sources:
        try:
            compile(read(), rel, "exec", dont_inherit=True)
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
    originals: Mapping[str, str] | None = None,
) -> PreflightReport:
    """`originals`: the environment's text files (path -> text) where the caller holds them
    already; otherwise the changed files' originals are read from the environment's folder."""
    with telemetry.step("pre-flight") as span:
        checks = [_traced(check_compiles(workspace, files_changed))]
        if checks[-1].ok:
            checks.append(_traced(check_protected(env, workspace)))
        trusted = None
        if checks[-1].ok and env.manifest.trusted_knobs:
            before = (
                _read_texts(env.root, files_changed)
                if originals is None
                else {rel: originals[rel] for rel in files_changed if rel in originals}
            )
            trusted = trusted_knob_settings(env, before, _read_texts(workspace, files_changed))
        if trusted is not None:
            checks.append(_traced(_smoke_skipped(trusted)))
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


def preflight_from_texts(
    env: Environment, before: Mapping[str, str], after: Mapping[str, str]
) -> PreflightReport | None:
    """run_preflight's report on the patched workspace, for a patch that needs no smoke run
    (a trusted knob-only one), from the changed files' texts: `before`, `after` as read from
    the environment and from the workspace (a file missing on one side: created or deleted).
    None, having checked nothing, for any patch that needs a smoke run (and so a workspace).
    The protected files of such a workspace are the environment's own (a patch may not touch
    them), so they are checked in the environment's folder."""
    trusted = trusted_knob_settings(env, before, after)
    if trusted is None:
        return None
    with telemetry.step("pre-flight") as span:
        checks = [_traced(check_compiles_texts(after))]
        if checks[-1].ok:
            checks.append(_traced(check_protected(env, env.root)))
        if checks[-1].ok:
            checks.append(_traced(_smoke_skipped(trusted)))
        report = PreflightReport(passed=all(c.ok for c in checks), checks=checks)
        span.set_attribute("groundloop.passed", report.passed)
        return report


def trusted_knob_settings(
    env: Environment, before: Mapping[str, str], after: Mapping[str, str]
) -> dict[str, str] | None:
    """The knob settings of a patch that needs no smoke run (see knob_only.py), or None.
    `before`/`after`: each changed file's text before and after the patch (absent: no file)."""
    if not env.manifest.trusted_knobs or not (before or after):
        return None
    return knob_only_change(env.manifest, before, after)


def _read_texts(root: Path, files: list[str]) -> dict[str, str]:
    texts = {}
    for rel in files:
        try:
            texts[rel] = (root / rel).read_text()
        except (OSError, UnicodeDecodeError):
            pass  # missing: a new or deleted file, never knob-only
    return texts


def _smoke_skipped(trusted: dict[str, str]) -> PreflightCheck:
    settings = ", ".join(f"{name}={value}" for name, value in sorted(trusted.items()))
    return PreflightCheck(
        name="smoke",
        ok=True,
        detail=f"skipped: the patch only sets knobs within their declared "
        f"ranges ({settings}), which the manifest trusts (trusted_knobs)",
    )


def _traced(check: PreflightCheck) -> PreflightCheck:
    """The check as a span of its own, timed by its own clock (it just ended)."""
    telemetry.finished_step(f"pre-flight {check.name}", check.seconds, passed=check.ok)
    return check


def failure_detail(report: PreflightReport) -> str:
    failed = next((c for c in report.checks if not c.ok), None)
    return f"pre-flight check '{failed.name}' failed: {failed.detail}" if failed else ""
