"""The price table is data (prices.toml, dated entries); unpriced hosted models are refused."""

from __future__ import annotations

import datetime

import pytest

from groundloop.llm.client import LLMSettings, ModelPriceUnknown, make_client
from groundloop.llm.pricing import (
    DEFAULT_PRICES,
    builtin_price_entries,
    load_price_table,
    parse_price_flag,
)


def test_the_shipped_file_loads_and_every_entry_has_its_date() -> None:
    entries = builtin_price_entries()
    assert entries and set(entries) == set(DEFAULT_PRICES)
    for key, entry in entries.items():
        assert isinstance(entry["read_on"], datetime.date), key
        assert DEFAULT_PRICES[key].output_per_mtok == entry["output_per_mtok"] > 0


def test_a_user_file_overrides_entries(tmp_path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text('["openai:gpt-5"]\ninput_per_mtok = 9.0\noutput_per_mtok = 99.0\n')
    table = load_price_table(path)
    assert table["openai:gpt-5"].output_per_mtok == 99.0
    assert table["openai:o3"] == DEFAULT_PRICES["openai:o3"]


def test_an_unknown_hosted_model_is_refused_naming_the_flag(monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with pytest.raises(ModelPriceUnknown, match="--price MODEL=IN,OUT"):
        make_client("openai:gpt-unknown", LLMSettings())
    with pytest.raises(ModelPriceUnknown):
        make_client("openai-compatible:m@https://api.example.com/v1", LLMSettings())
    model, price = parse_price_flag("openai:gpt-unknown=1.5,6")
    client = make_client("openai:gpt-unknown", LLMSettings(prices={model: price}))
    assert client is not None


def test_a_local_server_is_free() -> None:
    for url in ("http://localhost:8000/v1", "http://127.0.0.1:11434/v1"):
        client = make_client(f"openai-compatible:qwen@{url}", LLMSettings())
        price = client.price  # type: ignore[attr-defined]
        assert price is not None and price.input_per_mtok == price.output_per_mtok == 0.0
