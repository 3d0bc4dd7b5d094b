"""Setting up the bus: the streams and buckets `Bus.connect` creates or updates (idempotent).

The log stream, the dead-letter and quarantine streams, the processed-events KV and the
artifact object store, each kept on `Settings.stream_replicas` nodes of a JetStream cluster
(R3 in production, so one node may die without losing an acknowledged event). A broker that
cannot keep that many copies — a single server, or a cluster with fewer nodes up — is
refused with a message that says so, instead of JetStream's terse error.

Only roles that manage the bus (the CLI, the operator) change what exists: a stream's
limits, or its replica count when the setting changed; the others use it as it is.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from nats.errors import TimeoutError as NatsTimeout
from nats.js import api
from nats.js.errors import APIError, BadRequestError, NotFoundError, ServiceUnavailableError

from groundloop.permissions import Names
from groundloop.settings import Settings

log = logging.getLogger(__name__)

NOT_CLUSTERED = 10074  # "replicas > 1 not supported in non-clustered mode"
NO_PEERS = 10005  # "no suitable peers for placement": fewer nodes up than replicas asked
INSUFFICIENT_RESOURCES = 10023
REPLICA_REFUSALS = (NOT_CLUSTERED, NO_PEERS, INSUFFICIENT_RESOURCES)
JS_TIMEOUT_S = 10.0  # one JetStream API request
SETUP_TRIES = 3  # of the whole set-up, when JetStream does not answer


class BrokerUnavailable(RuntimeError):
    """The broker cannot be reached, refuses this process, or cannot keep what it is asked."""


@dataclass(frozen=True)
class Stores:
    objects: Any  # nats-py ObjectStore: artifacts
    processed: Any  # nats-py KeyValue: which events each role processed


def replicas_refused(what: str, replicas: int, exc: APIError) -> BrokerUnavailable:
    """JetStream's refusal to place `replicas` copies of `what`, in words an operator can act on."""
    if exc.err_code == NOT_CLUSTERED:
        broker = "this broker is a single nats-server, not a JetStream cluster"
    else:
        broker = f"the cluster has fewer than {replicas} JetStream nodes up"
    return BrokerUnavailable(
        f"JetStream cannot keep {replicas} copies of {what} ({exc.description}, "
        f"error {exc.err_code}): {broker}. Set GROUNDLOOP_STREAM_REPLICAS to at most the "
        "number of nodes (1 for a single server), or bring the missing nodes up"
    )


async def ensure_asking_again(
    js: Any, settings: Settings, names: Names, *, manages: bool, tries: int = SETUP_TRIES
) -> Stores:
    """`ensure`, asked again when JetStream does not answer: every step is create-or-update,
    so asking again is safe. A cluster under load can take longer than one request's timeout
    to place a replicated stream; one that lost its quorum answers nothing (or "temporarily
    unavailable") until it is back, and is then refused in words, not a bare timeout."""
    for attempt in range(1, tries + 1):
        try:
            return await ensure(js, settings, names, manages=manages)
        except (NatsTimeout, ServiceUnavailableError):
            if attempt == tries:
                break
            log.warning(
                "JetStream did not answer setting up the streams (try %d of %d); asking again",
                attempt,
                tries,
            )
            await asyncio.sleep(1.0)  # "temporarily unavailable" comes back at once
    raise BrokerUnavailable(
        f"JetStream at {settings.nats_url} did not answer while setting up the log's streams "
        f"and buckets ({tries} tries, each timed out after {JS_TIMEOUT_S:g} s or said "
        "'temporarily unavailable'): a cluster that lost its quorum (a majority of its nodes "
        "down), one still electing its leaders, or a server too loaded to answer; check the "
        "nodes (each one's /jsz monitoring page names the meta leader) and start again"
    )


async def ensure(js: Any, settings: Settings, names: Names, *, manages: bool) -> Stores:
    """Create or update every stream and bucket of `settings`; the buckets' handles."""
    s, replicas = settings, settings.stream_replicas
    await ensure_stream(
        js,
        api.StreamConfig(
            name=s.stream,
            subjects=[f"{s.subject_prefix}.>"],
            storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.LIMITS,
            max_age=0,  # the log is never aged out
            duplicate_window=s.duplicate_window_s,
            allow_direct=True,
            num_replicas=replicas,
        ),
        manages=manages,
    )
    for name, subjects in (
        (s.dlq_stream, f"{s.subject_prefix}_dlq.>"),
        (names.quarantine_stream, f"{s.subject_prefix}_quarantine.>"),
    ):
        config = api.StreamConfig(
            name=name,
            subjects=[subjects],
            storage=api.StorageType.FILE,
            max_age=0,
            num_replicas=replicas,
        )
        await ensure_stream(js, config, manages=manages)
    objects = api.ObjectStoreConfig(
        bucket=s.artifacts_bucket, storage=api.StorageType.FILE, replicas=replicas
    )
    processed = api.KeyValueConfig(
        bucket=names.processed_bucket,
        history=1,
        storage=api.StorageType.FILE,
        replicas=replicas,
    )
    return Stores(
        objects=await ensure_bucket(
            js,
            lambda: js.object_store(s.artifacts_bucket),
            lambda: js.create_object_store(s.artifacts_bucket, config=objects),
            f"OBJ_{s.artifacts_bucket}",
            replicas,
            manages=manages,
        ),
        processed=await ensure_bucket(
            js,
            lambda: js.key_value(processed.bucket),
            lambda: js.create_key_value(config=processed),
            f"KV_{processed.bucket}",
            replicas,
            manages=manages,
        ),
    )


async def ensure_stream(js: Any, config: api.StreamConfig, *, manages: bool) -> None:
    replicas = config.num_replicas or 1
    try:
        info = await js.stream_info(config.name)
    except NotFoundError:
        try:
            await js.add_stream(config)
        except APIError as exc:
            if exc.err_code in REPLICA_REFUSALS:
                raise replicas_refused(f"stream {config.name}", replicas, exc) from None
            if not isinstance(exc, BadRequestError):
                raise
            # otherwise another process created it between our two calls
        return
    # Only roles that manage the bus may change an existing stream (a role's key must not be
    # able to shrink the log's limits); the others use it as it is.
    if manages:
        try:
            await js.update_stream(config)
        except APIError as exc:
            if exc.err_code in REPLICA_REFUSALS:
                raise replicas_refused(f"stream {config.name}", replicas, exc) from None
            raise
    else:
        _say_if_replicas_differ(str(config.name), info.config.num_replicas, replicas)


async def ensure_bucket(
    js: Any,
    get: Callable[[], Awaitable[Any]],
    create: Callable[[], Awaitable[Any]],
    stream: str,
    replicas: int,
    *,
    manages: bool,
) -> Any:
    """The bucket (a KV or object store, kept in JetStream stream `stream`), created when
    missing; a managing role also moves an existing one to `replicas` copies."""
    try:
        bucket = await get()
    except (NotFoundError, APIError):
        try:
            return await create()
        except APIError as exc:
            if exc.err_code in REPLICA_REFUSALS:
                raise replicas_refused(f"bucket stream {stream}", replicas, exc) from None
            if not isinstance(exc, BadRequestError):
                raise
            return await get()  # created by another process meanwhile
    info = await js.stream_info(stream)
    if info.config.num_replicas == replicas:
        return bucket
    if not manages:
        _say_if_replicas_differ(stream, info.config.num_replicas, replicas)
        return bucket
    try:
        await js.update_stream(info.config.evolve(num_replicas=replicas))
    except APIError as exc:
        if exc.err_code in REPLICA_REFUSALS:
            raise replicas_refused(f"bucket stream {stream}", replicas, exc) from None
        raise
    return bucket


def _say_if_replicas_differ(stream: str, have: int | None, want: int) -> None:
    if (have or 1) != want:
        log.warning(
            "stream %s keeps %d copies, GROUNDLOOP_STREAM_REPLICAS asks %d: a role that manages "
            "the bus (the CLI) changes it when it next connects",
            stream,
            have or 1,
            want,
        )
