"""GROUNDLOOP_NATS_URL: one broker URL or the nodes of a cluster, each checked up front."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from groundloop.broker import free_port
from groundloop.bus import Bus
from groundloop.settings import Settings


def test_several_comma_separated_urls_are_the_servers_in_the_order_given():
    settings = Settings(nats_url="nats://a:4222, tls://b:4223 ,nats://c")
    assert settings.nats_servers() == ["nats://a:4222", "tls://b:4223", "nats://c"]
    assert settings.nats_url == "nats://a:4222,tls://b:4223,nats://c"


def test_a_list_reads_like_the_comma_separated_variable():
    listed = Settings(nats_url=["nats://a:4222", "nats://b:4222"])
    assert listed.nats_url == Settings(nats_url="nats://a:4222,nats://b:4222").nats_url


def test_the_variable_takes_several_urls(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GROUNDLOOP_NATS_URL", "nats://n1:4222,nats://n2:4222")
    assert Settings().nats_servers() == ["nats://n1:4222", "nats://n2:4222"]


def test_a_bare_host_and_port_means_nats_and_empty_means_embedded():
    assert Settings(nats_url="broker:4222").nats_servers() == ["nats://broker:4222"]
    assert Settings(nats_url=" , ").nats_url is None
    assert Settings(nats_url=None).nats_servers() == []


@pytest.mark.parametrize(
    "bad", ["http://broker:4222", "nats://broker:99999", "nats://:4222", "nats://a:1,nats://b:x"]
)
def test_a_url_no_nats_client_can_dial_is_refused_by_name(bad: str):
    with pytest.raises(ValidationError, match="is not a NATS URL") as refused:
        Settings(nats_url=bad)
    assert "separate the nodes of a cluster with commas" in str(refused.value)


@pytest.mark.parametrize("replicas", [0, 6])
def test_stream_replicas_outside_what_jetstream_keeps_are_refused(replicas: int):
    with pytest.raises(ValidationError, match="stream_replicas"):
        Settings(stream_replicas=replicas)


async def test_the_bus_connects_through_the_next_url_when_the_first_is_down(settings: Settings):
    down = f"nats://127.0.0.1:{free_port()}"
    bus = await Bus.connect(
        settings.model_copy(update={"nats_url": f"{down},{settings.nats_url}"}), "t"
    )
    try:
        assert bus.nc.connected_url.geturl() == settings.nats_url
    finally:
        await bus.close()
