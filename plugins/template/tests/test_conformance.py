"""The whole conformance suite (hwft.testing.conformance) against the template backend."""

from hwft.testing.conformance import *  # noqa: F401,F403
