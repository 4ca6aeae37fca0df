"""Errors of the routing-knowledge layer.

StateError
└── StateUnavailable   the backend (Redis) could not be reached or answered with an error
"""


class StateError(Exception):
    """Base of every error raised by `state`."""


class StateUnavailable(StateError):
    """The shared store could not be used; callers fall back to local routing."""
