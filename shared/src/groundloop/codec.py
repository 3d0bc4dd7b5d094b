"""Bytes to events and back: the one decoder, upcasting of old versions, schema snapshots.

Knows no particular event: `groundloop.events` builds one `EventCodec` over its closed set of
event types and re-exports `encode`, `decode`, `upcast`, `UPCASTERS` and the schema helpers,
so every service keeps importing them from `groundloop.events`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Union

from pydantic import Field, TypeAdapter, ValidationError

if TYPE_CHECKING:
    from groundloop.events import Event

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


class InvalidEvent(ValueError):
    """Bytes that are not a valid event; the message says why (recorded on the dead-letter)."""


def encode(event: Event) -> bytes:
    return event.model_dump_json().encode()


def schema_of(cls: type[Event]) -> dict[str, Any]:
    return cls.model_json_schema(mode="validation")


class EventCodec:
    """JSON encoding and decoding of a closed set of event types, discriminated by `type`."""

    def __init__(self, event_types: tuple[type[Event], ...], schema_dir: Path) -> None:
        self.event_types = event_types
        self.by_type: dict[str, type[Event]] = {cls.TYPE: cls for cls in event_types}
        # Built at run time from `event_types`, so no static type describes it.
        self.union: Any = Annotated[Union[event_types], Field(discriminator="type")]  # noqa: UP007
        self.adapter: TypeAdapter[Event] = TypeAdapter(self.union)
        # (type, old version) -> function turning that payload dict into the next version's dict.
        self.upcasters: dict[tuple[str, int], Upcaster] = {}
        self.schema_dir = schema_dir

    def upcast(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Lift an old payload to the current version of its type, one step at a time."""
        kind = payload.get("type")
        if kind not in self.by_type:
            return payload
        current = self.by_type[kind].VERSION
        while isinstance(payload.get("version"), int) and payload["version"] < current:
            step = self.upcasters.get((kind, payload["version"]))
            if step is None:
                raise InvalidEvent(f"{kind} v{payload['version']} has no upcaster to v{current}")
            payload = step(dict(payload))
        return payload

    def decode(self, data: bytes | str | dict[str, Any]) -> Event:
        """The one decoder. Raises InvalidEvent with a readable reason, never anything else."""
        if not isinstance(data, dict):
            try:  # fast path: current-version events validate straight from JSON
                return self.adapter.validate_json(data)
            except ValidationError:
                pass  # fall through for upcasting or a precise error message
        try:
            payload = data if isinstance(data, dict) else json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidEvent(f"not JSON: {exc}") from None
        if not isinstance(payload, dict):
            raise InvalidEvent(f"expected a JSON object, got {type(payload).__name__}")
        kind = payload.get("type")
        if kind not in self.by_type:
            known = ", ".join(self.by_type)
            raise InvalidEvent(f"unknown event type {kind!r}; known types: {known}")
        try:
            return self.adapter.validate_python(self.upcast(payload))
        except ValidationError as exc:
            errors = "; ".join(
                f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()[:5]
            )
            raise InvalidEvent(f"invalid {kind}: {errors}") from None

    def schema_path(self, cls: type[Event]) -> Path:
        return self.schema_dir / f"{cls.TYPE}.v{cls.VERSION}.json"

    def write_schemas(self) -> list[Path]:
        """Write the snapshot of every current (type, version); refuses to overwrite a different
        snapshot of the same version, because that is exactly the change that needs a bump."""
        self.schema_dir.mkdir(exist_ok=True)
        written = []
        for cls in self.event_types:
            path = self.schema_path(cls)
            text = json.dumps(schema_of(cls), indent=2, sort_keys=True) + "\n"
            if path.exists() and path.read_text() != text:
                raise SystemExit(
                    f"{path.name} exists with a different schema: bump {cls.__name__}'s version "
                    "(and add an upcaster) instead of rewriting a published schema"
                )
            path.write_text(text)
            written.append(path)
        return written
