"""DNS discovery in a gateway process: a name resolved by the system resolver becomes nodes.

The name is `localhost` (it resolves to 127.0.0.1 on every machine, without a DNS server to run);
the removal of records that disappear is covered with an injected resolver in
tests/unit/test_discovery.py.
"""

from __future__ import annotations

import httpx
import pytest

from tests.integration.test_health import eventually, sim_stats, turn
from tests.procs import gateway, sim_node

pytestmark = pytest.mark.slow


def test_gateway_uses_the_nodes_a_name_resolves_to() -> None:
    with sim_node("--prefill-tps", "0") as node:
        env = {
            "MLXMUX_DISCOVERY": "dns",
            "MLXMUX_DISCOVERY_DNS_NAME": "localhost",
            "MLXMUX_DISCOVERY_PORT": str(node.port),
            "MLXMUX_DISCOVERY_INTERVAL_S": "0.3",
            "MLXMUX_HEALTH_INTERVAL_S": "0.3",
        }
        with gateway(env=env) as g:
            node_id = f"127.0.0.1:{node.port}"

            def states() -> dict[str, str]:
                return {n["id"]: n["state"] for n in httpx.get(g.url + "/cluster", timeout=5).json()["nodes"]}

            eventually(lambda: states().get(node_id) == "healthy", timeout=10, what="the resolved node is healthy")
            session = "dns-0000-4000-8000-000000000000"
            assert "Hello from sim node" in turn(g, session)
            assert session in sim_stats(node)["per_conversation"]
