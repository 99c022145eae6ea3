"""A reward for testing GRPO on random tiny models, registered only while hwft's pytest
plugin runs (``HWFT_TESTING_REWARDS``): the share of vowels among a completion's letters.
Continuous, so even a random model's completions in one group score differently."""

from __future__ import annotations

import pluggy

hookimpl = pluggy.HookimplMarker("hwft")


def testing_vowels(samples, scale: float = 1.0) -> list[float]:
    out = []
    for s in samples:
        letters = [c for c in s.completion.lower() if c.isalpha()]
        out.append(scale * sum(c in "aeiou" for c in letters) / max(len(letters), 1))
    return out


@hookimpl
def hwft_register_rewards(register):
    register("testing_vowels", testing_vowels, description="share of vowels (hwft.testing, for tests)")
