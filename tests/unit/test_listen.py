"""A port the gateway, the demo or a sim node cannot listen on is one line saying why and what to change."""

from __future__ import annotations

import socket

import pytest

from proxy.listen import CannotListen, check_can_listen


def test_a_busy_port_names_the_flag_to_change() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(CannotListen) as info:
            check_can_listen("127.0.0.1", port, what="sim node 1", flag="--node-port")
    assert str(info.value) == (
        f"port {port} on 127.0.0.1 is already in use (another mlxmux or another program): choose another --node-port"
    )


def test_a_free_port_passes() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    check_can_listen("127.0.0.1", port)


@pytest.mark.parametrize(
    ("host", "port", "words"),
    [
        ("127.0.0.1", 99999, "--port must be 1..65535, not 99999"),
        ("127.0.0.1", 0, "--port must be 1..65535, not 0"),
        ("192.0.2.1", 8420, "192.0.2.1 is not an address of this machine"),  # TEST-NET-1: never local
    ],
)
def test_addresses_that_cannot_be_listened_on(host: str, port: int, words: str) -> None:
    with pytest.raises(CannotListen, match=words):
        check_can_listen(host, port)
