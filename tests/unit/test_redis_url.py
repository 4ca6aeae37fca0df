"""Store URLs taken apart without connecting (state/redis_url.py), and the one-line errors of bad ones."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from proxy.config import ConfigError, load_settings
from state import open_store
from state.redis_url import SentinelAddress, check_store_url, parse_sentinel_url
from tests.procs import ROOT


@pytest.mark.parametrize(
    ("url", "address"),
    [
        (
            "redis+sentinel://10.0.0.1:26379,10.0.0.2:26380/mymaster/0",
            SentinelAddress(sentinels=(("10.0.0.1", 26379), ("10.0.0.2", 26380)), service="mymaster"),
        ),
        (  # default port, database 3, the servers' password percent-encoded
            "redis+sentinel://:p%40ss%3Aw@s1,s2:5000/cache%20main/3",
            SentinelAddress(sentinels=(("s1", 26379), ("s2", 5000)), service="cache main", db=3, password="p@ss:w"),
        ),
        (  # an ACL user; the sentinels' own password; TLS with a CA file (a redis-py URL option, kept)
            "rediss+sentinel://gw:pw@[fd00::1]:26379,s2/m?sentinel_password=spw&ssl_ca_certs=/etc/ca.pem",
            SentinelAddress(
                sentinels=(("fd00::1", 26379), ("s2", 26379)),
                service="m",
                tls=True,
                username="gw",
                password="pw",
                sentinel_password="spw",
                query="ssl_ca_certs=%2Fetc%2Fca.pem",
            ),
        ),
        (
            "redis+sentinel://s1/m/?sentinel_username=watcher",
            SentinelAddress(sentinels=(("s1", 26379),), service="m", sentinel_username="watcher"),
        ),
    ],
)
def test_sentinel_urls(url: str, address: SentinelAddress) -> None:
    assert parse_sentinel_url(url) == address
    check_store_url(url)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://s1:26379", "names the master after the hosts"),
        ("redis+sentinel://s1:26379/", "names the master after the hosts"),
        ("redis+sentinel://s1/m/zero", "only a database number, not 'zero'"),
        ("redis+sentinel://s1/m/0/extra", "only a database number"),
        ("redis+sentinel://s1:0/m", "the port must be 1..65535"),
        ("redis+sentinel://s1:x/m", "the port must be 1..65535"),
        ("redis+sentinel://s1,,s2/m", "has no host"),
        ("redis+sentinel://[fd00::1/m", "is not [IPv6]:port"),
        ("redis+cluster://n1:7000,n2:7000", "Redis Cluster is not supported"),
        ("rediss+cluster://n1:7000", "Redis Cluster is not supported"),
        ("http://redis:6379", "must start with memory://, redis://"),
        ("localhost:6379", "must start with memory://, redis://"),
    ],
)
def test_bad_store_urls_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        check_store_url(url)
    with pytest.raises(ValueError, match=re.escape(message)):
        open_store(url)


def test_config_errors_never_show_the_passwords() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={"MLXMUX_REDIS_URL": "redis+sentinel://:secret1@s1:26379/m/x?sentinel_password=secret2"})
    assert str(info.value) == (
        "redis url 'redis+sentinel://***@s1:26379/m/x': after the master name a Sentinel URL takes only a "
        "database number, not 'x'"
    )


def test_a_sentinel_url_is_accepted_from_every_source() -> None:
    url = "redis+sentinel://:pw@s1:26379,s2:26379/mymaster/0"
    assert load_settings(env={"MLXMUX_REDIS_URL": url}).redis_url == url
    assert load_settings(env={}, overrides={(None, "redis_url"): url}).redis_url == url


@pytest.mark.parametrize(
    "url", ["redis+cluster://:pw@n1:7000,n2:7000", "redis+sentinel://:pw@s1:26379", "ftp://:pw@redis:6379"]
)
def test_mlxmux_serve_stops_on_a_bad_redis_url_with_one_line(url: str) -> None:
    args = [sys.executable, "-m", "proxy.cli", "serve", "--redis", url]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlxmux: error: redis url "), proc.stderr
    assert "pw" not in proc.stderr
