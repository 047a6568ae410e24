"""pytest fixtures, registered through the ``pytest11`` entry point.

``pop3_controller_factory`` starts servers and stops them after the test::

    def test_login(pop3_controller_factory):
        server = pop3_controller_factory(MyAdapter())
        client = server.pop3()
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, List

import pytest

from .testing import Controller


@pytest.fixture
def pop3_controller_factory() -> Iterator[Callable[..., Controller]]:
    started: List[Controller] = []

    def factory(adapter: Any, **kwargs: Any) -> Controller:
        controller = Controller(adapter, **kwargs).start()
        started.append(controller)
        return controller

    yield factory
    for controller in reversed(started):
        controller.stop()
