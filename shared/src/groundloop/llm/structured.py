"""Structured output: a JSON schema a caller hands to `LLMClient.complete(response_format=...)`.

OpenAI and OpenAI-compatible servers (vLLM, llama.cpp, Ollama) get it as `response_format`
`json_schema`; Anthropic gets it as a single tool the model must call, whose input is the
answer. Either way the completion's text is the JSON document, so callers parse one thing.
A server that refuses the parameter is asked again without it (plain text), once per client.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class JsonSchema:
    name: str  # letters, digits, '_' and '-': both providers require it
    schema: dict[str, Any] = field(hash=False)
    description: str = ""

    def openai_response_format(self) -> dict[str, Any]:
        return {
            "type": "json_schema",
            "json_schema": {"name": self.name, "schema": self.schema, "strict": True},
        }

    def anthropic_tool(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description or f"Record the answer as {self.name}.",
            "input_schema": self.schema,
        }


def tool_input_text(content: list[Any], name: str) -> str | None:
    """The JSON text of the forced tool call in an Anthropic answer's content blocks."""
    for block in content:
        if getattr(block, "type", "") == "tool_use" and getattr(block, "name", "") == name:
            return json.dumps(getattr(block, "input", {}))
    return None
