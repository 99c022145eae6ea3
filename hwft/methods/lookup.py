"""The registered methods of the process-wide plugin host, looked up by name."""

from __future__ import annotations

from hwft.methods.record import Method, MethodRegistry


def registry() -> MethodRegistry:
    """The methods of the process-wide plugin host."""
    from hwft.plugins import get_host

    return get_host().methods()


def method(name: str) -> Method:
    """The registered method ``name`` (a RecipeError with a did-you-mean if there is none)."""
    return registry().get(name)
