"""Who may publish what: the one permission map of the bus, per role.

Each role connects with its own NATS nkey (`groundloop.identity`) and may publish only the
event types it emits and use only its own durable consumers, dead-letter subject and
processed-event keys. The same map is used three ways:

- the broker's `authorization` block (`server_config`): the embedded broker and the tests run
  with it, `deploy/nats/groundloop.conf` is rendered from it (`render_deploy`; regenerate with
  `python -m groundloop.permissions render deploy/nats/groundloop.conf`, a test checks it);
- readers (`Bus.read`) check that an event's signer may produce its type under its producer
  name (`producer_refusal`), so a role's key cannot vouch for another role's events;
- `role_of` maps the name a process connects with (`Bus.connect(settings, name)`) to a role.

Readers may read the whole log (any role can also fetch any message by sequence, which the
dead-letter and exhausted-delivery paths need), so the map restricts writes: events, acks,
dead letters, processed records, artifacts, consumer and stream changes.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from groundloop.events import EVENT_TYPES, ResourceClass
from groundloop.settings import Settings

HISTORY_PREFIX = "history:"  # producer of events copied by fork/import (groundloop.consumer)
OPERATOR = "operator"  # the administrator's key: tools, tests, benchmarks, repairs
ALL_TYPES = frozenset(cls.TYPE for cls in EVENT_TYPES)
RUNNER_CONSUMERS = tuple(f"runner-{rc}" for rc in get_args(ResourceClass))


@dataclass(frozen=True)
class Grant:
    """What one role may do. `emits`: event types it may publish (and sign) with producer
    `producer`; `consumers`: its durable consumer names (also its dead-letter subjects and
    processed-record keys); `artifacts`: writes the object store; `manages`: may update
    stream configs (everyone may create a missing one); `copies`: may publish copies of any
    type whose producer starts with "history:" (fork, import)."""

    emits: frozenset[str]
    producer: str
    consumers: tuple[str, ...] = ()
    artifacts: bool = False
    manages: bool = False
    copies: bool = False


ROLES: dict[str, Grant] = {
    "cli": Grant(frozenset({"SearchStarted", "SearchStopped"}), "cli", manages=True, copies=True),
    "evolver": Grant(
        frozenset({"GenerationAdvanced", "RunRequested", "SearchCompleted", "SearchStopped"}),
        "evolver",
        ("evolver",),
    ),
    "ideator": Grant(
        frozenset({"IdeaProposed", "IdeasShortfall", "SearchStopped"}), "ideator", ("ideator",)
    ),
    "implementer": Grant(
        frozenset({"PatchReady", "PatchFailed", "SearchStopped"}),
        "implementer",
        ("implementer",),
        artifacts=True,  # diffs over the inline limit
    ),
    "runner": Grant(
        frozenset({"RunStarted", "RunCompleted"}),
        "runner",
        RUNNER_CONSUMERS,
        artifacts=True,  # run logs
    ),
    "rl-trainer": Grant(
        frozenset({"IdeaProposed", "PolicyUpdated", "SearchStopped"}),
        "rl-trainer",
        ("rl-trainer",),
        artifacts=True,  # policy checkpoints
    ),
    "projector": Grant(frozenset(), "projector", ("projector",)),
    OPERATOR: Grant(ALL_TYPES, "*", manages=True, copies=True),
}
# Connection names that are not "<role>" or "<role>-<anything>".
ALIASES = {"replay": "projector", "api": "projector"}


def role_of(connection_name: str) -> str:
    """The role a connection named `connection_name` runs as: the role of that name, or of
    its first dash-separated prefix (`runner-<id>`, `cli-tail`, `rl-trainer-0`), or an alias;
    any other name (tests, benchmarks, ad-hoc tools) is the operator, whose key only an
    administrator holds."""
    if connection_name in ALIASES:
        return ALIASES[connection_name]
    for role in sorted(ROLES, key=len, reverse=True):
        if connection_name == role or connection_name.startswith(role + "-"):
            return role
    return OPERATOR


def producer_refusal(role: str, event_type: str, producer: str) -> str | None:
    """Why an event of `event_type` with `producer`, signed by `role`, is not to be believed;
    None when the role may produce it."""
    grant = ROLES.get(role)
    if grant is None:
        return f"signed by {role!r}, which is no role of the permission map"
    if role == OPERATOR:
        return None
    if grant.copies and producer.startswith(HISTORY_PREFIX):
        return None
    if event_type not in grant.emits:
        may = ", ".join(sorted(grant.emits)) or "nothing"
        return f"role {role} may not publish {event_type} (it may publish: {may})"
    if producer != grant.producer:
        return f"signed by role {role} but names producer {producer!r}"
    return None


@dataclass(frozen=True)
class Names:
    """The bus's names a permission refers to, from the settings."""

    prefix: str = "gl"
    stream: str = "GROUNDLOOP"
    dlq_stream: str = "GROUNDLOOP_DLQ"
    bucket: str = "groundloop-artifacts"

    @classmethod
    def of(cls, settings: Settings) -> Names:
        return cls(
            settings.subject_prefix,
            settings.stream,
            settings.dlq_stream,
            settings.artifacts_bucket,
        )

    @property
    def quarantine_stream(self) -> str:
        return f"{self.stream}_QUARANTINE"

    @property
    def processed_bucket(self) -> str:
        return f"{self.stream}_processed"


def _all_consumers() -> list[str]:
    return sorted({c for grant in ROLES.values() for c in grant.consumers})


def permissions(role: str, n: Names) -> dict[str, dict[str, list[str]]]:
    """The nats-server `permissions` block of `role`: publish allow/deny and subscribe allow."""
    if role == OPERATOR:
        return {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}}
    grant = ROLES[role]
    api = "$JS.API"
    kv, obj = f"KV_{n.processed_bucket}", f"OBJ_{n.bucket}"
    streams = [n.stream, n.dlq_stream, n.quarantine_stream, kv, obj]
    types = sorted(ALL_TYPES) if grant.copies else sorted(grant.emits)
    allow = [f"{n.prefix}.*.{t}.>" for t in types]
    allow += [f"{n.prefix}_quarantine.*"]  # any reader records garbage it meets
    # INFO; STREAM.NAMES: nats-py's object-store get looks up the bucket's stream by subject.
    allow += [f"{api}.INFO", f"{api}.STREAM.NAMES"]
    allow += [f"{api}.STREAM.{verb}.{s}" for s in streams for verb in ("INFO", "CREATE")]
    if grant.manages:
        allow += [f"{api}.STREAM.UPDATE.{s}" for s in streams]
    # Reading: by sequence, and through ephemeral consumers (random names) on any stream.
    allow += [f"{api}.STREAM.MSG.GET.{s}" for s in streams]
    allow += [f"{api}.DIRECT.GET.{s}" for s in streams] + [
        f"{api}.DIRECT.GET.{s}.>" for s in streams
    ]
    for s in (n.stream, obj):
        allow += [f"{api}.CONSUMER.{verb}.{s}.*" for verb in ("CREATE", "INFO", "DELETE")]
        allow += [f"{api}.CONSUMER.CREATE.{s}", f"{api}.CONSUMER.CREATE.{s}.*.>"]
        allow += [f"{api}.CONSUMER.MSG.NEXT.{s}.*", f"$JS.FC.{s}.>"]
    for c in grant.consumers:
        allow += [f"{api}.CONSUMER.DURABLE.CREATE.{n.stream}.{c}", f"$JS.ACK.{n.stream}.{c}.>"]
        allow += [f"{n.prefix}_dlq.{c}", f"$KV.{n.processed_bucket}.{c}.>"]
    if grant.artifacts:
        # Overwriting a key (a redone run's log, a re-stored checkpoint) purges its old chunks.
        allow += [f"$O.{n.bucket}.>", f"{api}.STREAM.PURGE.{obj}"]
    # Nobody but the owner creates, fetches from, updates or deletes a durable consumer, so
    # no role can take or hold back another role's work; no role deletes a durable.
    deny = []
    for c in _all_consumers():
        if c not in grant.consumers:
            for verb in ("CREATE", "INFO", "MSG.NEXT"):
                deny += [f"{api}.CONSUMER.{verb}.{n.stream}.{c}"]
            deny += [f"{api}.CONSUMER.CREATE.{n.stream}.{c}.>"]
        deny += [f"{api}.CONSUMER.DELETE.{n.stream}.{c}"]
    subscribe = [f"_INBOX_{role}.>"]
    subscribe += [
        f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{n.stream}.{c}" for c in grant.consumers
    ]
    return {"publish": {"allow": allow, "deny": deny}, "subscribe": {"allow": subscribe}}


def inbox_prefix(role: str) -> str:
    """Replies (JetStream API answers, fetched messages) come only to the role's own inboxes."""
    return f"_INBOX_{role}"


def _value(item: object, indent: str = "") -> str:
    """nats-server config syntax, one subject per line so a reviewer can read the map."""
    inner = indent + "  "
    if isinstance(item, dict):
        fields = "".join(f"{inner}{k}: {_value(v, inner)}\n" for k, v in item.items())
        return "{\n" + fields + indent + "}"
    if isinstance(item, list):
        return "[\n" + "".join(f"{inner}{_value(v, inner)},\n" for v in item) + indent + "]"
    return json.dumps(item) if isinstance(item, str) else str(item)


def merged_permissions(role: str, names: list[Names]) -> dict[str, dict[str, list[str]]]:
    """`permissions` of `role` over several deployments' names sharing one server (tests)."""
    merged: dict[str, dict[str, list[str]]] = {}
    for n in names:
        for direction, lists in permissions(role, n).items():
            for kind, subjects in lists.items():
                have = merged.setdefault(direction, {}).setdefault(kind, [])
                have += [s for s in subjects if s not in have]
    return merged


def authorization_block(
    names: list[Names], keys: dict[str, str], *, anonymous: tuple[str, str] | None = None
) -> str:
    """The `authorization { users = [...] }` block: one nkey user per role. `keys` maps a role
    to its public key, or to `$VARIABLE` (resolved by nats-server from its environment).
    `anonymous` = (role, password) binds clients without credentials to that role (tests
    whose subprocesses carry no credentials); never used by the deploy config."""
    users: list[dict[str, object]] = []
    for role in ROLES:
        users.append({"nkey": keys[role], "permissions": merged_permissions(role, names)})
    if anonymous is not None:
        role, password = anonymous
        user: dict[str, object] = {"user": f"anonymous-{role}", "password": password}
        users.append(user | {"permissions": merged_permissions(role, names)})
    lines = ["authorization {", "  users = ["]
    for role, entry in zip([*ROLES, "anonymous"], users, strict=False):
        lines.append(f"    # {role}")
        text = _value(entry, "    ")
        # `$VARIABLE` stays bare: nats-server resolves it from its environment
        if role in keys:
            text = text.replace(json.dumps(keys[role]), keys[role], 1)
        lines.append(f"    {text},")
    lines += ["  ]", "}"]
    if anonymous is not None:  # a top-level option naming a user of the block
        lines.append(f"no_auth_user: {json.dumps('anonymous-' + anonymous[0])}")
    return "\n".join(lines) + "\n"


def key_variable(role: str) -> str:
    """The environment variable holding `role`'s public key for the deploy config."""
    return "GROUNDLOOP_NKEY_" + role.upper().replace("-", "_")


DEPLOY_HEADER = """\
# groundloop's NATS server: JetStream, one nkey user per role, TLS.
# GENERATED from shared/src/groundloop/permissions.py; do not edit. Regenerate with
#   python -m groundloop.permissions render deploy/nats/groundloop.conf
# Each role's public key comes from the environment (GROUNDLOOP_NKEY_<ROLE>, written by
# `python -m groundloop.identity keys DIR`); the server refuses to start when one is missing.
# TLS: mount the server certificate, key and CA at /etc/nats/tls (deploy/nats/README.md).
listen: 0.0.0.0:4222
http: 0.0.0.0:8222
max_payload: 8MB
jetstream {
  store_dir: /data/jetstream
  max_file_store: 100GB
}
tls {
  cert_file: /etc/nats/tls/server.crt
  key_file: /etc/nats/tls/server.key
  ca_file: /etc/nats/tls/ca.crt
  timeout: 2
}
"""


def render_deploy(n: Names | None = None) -> str:
    """The committed deploy/nats/groundloop.conf for the default names."""
    keys = {role: "$" + key_variable(role) for role in ROLES}
    return DEPLOY_HEADER + authorization_block([n or Names()], keys)


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] in ("render", "check"):
        path, text = Path(argv[1]), render_deploy()
        if argv[0] == "render":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
            return 0
        if path.exists() and path.read_text() == text:
            return 0
        print(f"{path} is out of date: run python -m groundloop.permissions render {path}")
        return 1
    print("usage: python -m groundloop.permissions render|check PATH", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
