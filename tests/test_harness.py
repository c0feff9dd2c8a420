"""The test harness itself (serving/tools/testing.py): what every real-server test stands on."""

from __future__ import annotations

from typing import Any

import pytest

from serving.tools import testing


class OfferedSocket:
    """A socket whose kernel offers the ports of ``offers`` in turn (as Linux may offer a port that
    was just closed again)."""

    offers: list[int] = []

    def __enter__(self) -> OfferedSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def bind(self, address: Any) -> None:
        self.port = self.offers.pop(0)

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)


def test_free_port_never_hands_out_a_port_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    # a server's HTTP and gRPC binds once got the same port, and the server refused to start
    monkeypatch.setattr(testing.socket, "socket", OfferedSocket)
    monkeypatch.setattr(testing, "_HANDED_OUT", set(), raising=False)
    OfferedSocket.offers = [40001, 40001, 40001, 40002]
    assert [testing.free_port(), testing.free_port()] == [40001, 40002]
