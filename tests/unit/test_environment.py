"""MLXMUX_* variables: a misspelled one is named at start-up with the closest real one; the docs name real ones."""

from __future__ import annotations

import re

import pytest

from proxy.environment import ENV_KEYS, unknown_variable_warnings, unknown_variables
from tests.procs import ROOT


@pytest.mark.parametrize(
    ("name", "closest"),
    [
        ("MLXMUX_FIRST_BYTE_TIMEOUT", "MLXMUX_FIRST_BYTE_TIMEOUT_S"),
        ("MLXMUX_HEALTH_INTERVAL", "MLXMUX_HEALTH_INTERVAL_S"),
        ("MLXMUX_NODE", "MLXMUX_NODES"),
        ("MLXMUX_API_KEY", "MLXMUX_API_KEYS"),
        ("MLXMUX_REDIS", "MLXMUX_REDIS_URL"),
        ("MLXMUX_SESION_TTL_S", "MLXMUX_SESSION_TTL_S"),
        ("MLXMUX_LOGLEVEL", "MLXMUX_LOG_LEVEL"),
        ("MLXMUX_WHATEVER_THIS_IS", None),
    ],
)
def test_a_misspelled_variable_names_the_closest_real_one(name: str, closest: str | None) -> None:
    assert unknown_variables([name, "PATH", "MLXMUX_PORT"]) == [(name, closest)]


@pytest.mark.parametrize(
    "name",
    [*ENV_KEYS, "MLXMUX_NODES", "MLXMUX_API_KEYS", "MLXMUX_CONFIG", "MLXMUX_URL", "MLXMUX_GW1", "MLXMUX_GW10"],
)
def test_real_variables_are_not_warned_about(name: str) -> None:
    assert unknown_variables([name]) == []


def test_the_warning_line() -> None:
    env = {"MLXMUX_FIRST_BYTE_TIMEOUT": "900", "HOME": "/root"}
    assert unknown_variable_warnings(env) == [
        "environment variable MLXMUX_FIRST_BYTE_TIMEOUT is not an mlxmux setting and is ignored: "
        "did you mean MLXMUX_FIRST_BYTE_TIMEOUT_S?"
    ]


DOCUMENTS = [
    ROOT / "README.md",
    ROOT / ".env.example",
    ROOT / "docker-compose.yml",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "deploy").rglob("*.*")),
]


EXAMPLES = {"MLXMUX_FIRST_BYTE_TIMEOUT"}
"""Misspelled on purpose: the example of the start-up warning (docs/configuration.md)."""


@pytest.mark.parametrize("path", DOCUMENTS, ids=[str(p.relative_to(ROOT)) for p in DOCUMENTS])
def test_every_variable_the_docs_name_is_real(path) -> None:
    """A variable misspelled in the docs would be copied into shells and unit files, and silently ignored."""
    names = set(re.findall(r"\bMLXMUX_[A-Z0-9_]*[A-Z0-9]\b", path.read_text())) - EXAMPLES
    assert [name for name, _ in unknown_variables(names)] == []
