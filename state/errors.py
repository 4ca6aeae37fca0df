"""Errors of the routing-knowledge layer.

StateError
├── StateUnavailable   the backend (Redis) could not be reached or answered with an error
└── StoreUnsupported   the backend can never hold the shared state (a Redis Cluster node)
"""


class StateError(Exception):
    """Base of every error raised by `state`."""


class StateUnavailable(StateError):
    """The shared store could not be used; callers fall back to local routing."""


class StoreUnsupported(StateError):
    """The configured backend is reachable but cannot hold mlxmux's state; the message says why, in one line."""
