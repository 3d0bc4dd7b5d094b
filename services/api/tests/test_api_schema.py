"""Property-based test of the whole HTTP API against its own OpenAPI schema (schemathesis):
for every operation, requests generated from the schema (valid ones, invalid ones, and valid
ones aimed at the ids of a real search) must never get a 5xx, and every answer must match the
schema (status code documented, content type, body). The app is the real one over a real
small search: the story's events in a real nats-server's log (the analyses, run logs and
diffs read it) and projected into SQLite (everything else); requests go in-process (ASGI),
no network. Write endpoints get the token, so their bodies are exercised past the refusal
(test_control.py covers the refusals).

Left out: GET /live, the server-sent event stream, which never ends by design.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from pydantic import SecretStr
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from groundloop import events as ev
from groundloop.api.app import create_app
from groundloop.api.projector import project_all
from groundloop.api.store import make_engine, reset_tables
from groundloop.broker import NatsServer
from groundloop.bus import Bus
from groundloop.permissions import Names
from groundloop.settings import Settings
from tests.paths import REPO_ROOT
from tests.search_story import search_story

EXAMPLES = 25  # per operation and kind of input: the module stays well under a minute
TOKEN = "schema-test-token"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
STORY = search_story("s1", generations=2, ideas_per_generation=3)


def real_ids() -> dict[str, str]:
    """Path parameters that name things the store and the log hold."""
    run = next(e for e in STORY if isinstance(e, ev.RunCompleted) and e.purpose == "search")
    patch = next(e for e in STORY if isinstance(e, ev.PatchReady))
    return {
        "search_id": "s1",
        "idea_id": run.idea_id or "",
        "run_id": run.run_id,
        "patch_id": patch.patch_id,
    }


@pytest.fixture(scope="module")
def app(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("schema")
    settings = Settings(
        nats_url=nats_server.url,
        nats_credentials_dir=nats_server.credentials,
        data_dir=root / "data",
        db_url=f"sqlite:///{root / 'projections.db'}",
        environments_dir=REPO_ROOT / "environments",
        subject_prefix="tschema",
        stream="GL_SCHEMA",
        dlq_stream="GLDLQ_SCHEMA",
        artifacts_bucket="art_schema",
        api_token=SecretStr(TOKEN),
    )
    nats_server.serve(Names.of(settings))

    async def record() -> None:
        bus = await Bus.connect(settings, "test")
        try:
            for event in STORY:
                await bus.publish(event)
        finally:
            await bus.close()

    asyncio.run(record())
    engine = make_engine(settings.resolved_db_url())
    reset_tables(engine)
    project_all(engine, STORY)
    yield create_app(settings, engine=engine)
    shutdown_lifespans()  # closes the app's broker connections
    engine.dispose()


def test_no_operation_answers_5xx_or_off_schema(app) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app).exclude(path="/live")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20, [op.label for op in operations]
    assert not any(op.path == "/live" for op in operations)
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    started = time.perf_counter()
    ids = real_ids()
    for op in operations:
        params = {p.name for p in op.path_parameters}
        kinds = [
            ("random", GenerationMode.POSITIVE, None),
            ("invalid", GenerationMode.NEGATIVE, None),
        ]
        if params:
            kinds.append(("real ids", GenerationMode.POSITIVE, {k: ids[k] for k in params}))
        for kind, mode, fixed in kinds:
            strategy = op.as_strategy(generation_mode=mode, path_parameters=fixed)

            @given(case=strategy)
            @hypothesis_settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,  # the same requests on every run: CI cannot flake
                suppress_health_check=list(HealthCheck),
            )
            def check(case) -> None:
                response = case.call(headers={"Authorization": f"Bearer {TOKEN}"})
                statuses[response.status_code] += 1
                case.validate_response(response, checks=CHECKS)

            try:
                check()
            except Unsatisfiable:  # nothing invalid to send: e.g. a bare string path parameter
                assert mode is GenerationMode.NEGATIVE, op.label
            except (Exception, BaseExceptionGroup) as exc:  # schemathesis' FailureGroup
                failures.append(f"{op.label} ({kind}): {exc}")  # every operation's, not the first
    took = time.perf_counter() - started
    print(
        f"schemathesis: {len(operations)} operations, {sum(statuses.values())} requests in "
        f"{took:.1f} s, statuses {dict(sorted(statuses.items()))}, {len(failures)} failures"
    )
    assert not failures, "\n\n".join(failures)
    assert not any(s >= 500 for s in statuses)
    assert statuses[200] > 0 and statuses[404] > 0 and statuses[422] > 0
