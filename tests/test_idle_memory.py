"""What an idle subscribed connection costs the worker (the contract's target: 4 KiB)."""

from __future__ import annotations

from typing import Any

import pytest
from support.patched import assert_an_idle_subscribed_connection_costs_about_4_kib

pytestmark = pytest.mark.slow  # thousands of connections, and the heartbeat sweeps


def test_an_idle_subscribed_connection_costs_about_4_kib(start_server: Any) -> None:
    assert_an_idle_subscribed_connection_costs_about_4_kib(start_server)
