"""What the core hands to a backend: everything decided and validated before weights load."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from hwft.data.loading import TrainData
from hwft.models import ResolvedModel
from hwft.output import RunDir
from hwft.recipe import Recipe
from hwft.select import Choice


@dataclass
class Job:
    recipe: Recipe
    choice: Choice
    model: ResolvedModel
    data: TrainData  #: the parsed (or streamed) training data
    run_dir: RunDir
    quiet: bool = False
    results: dict = field(default_factory=dict)  #: the backend's summary (final loss, answers)
    #: one record per optimizer step: step, seconds, tokens (non-padding), trained (label
    #: tokens), attended (causal attention pairs), loss, examples (indices of the tokenised
    #: sequences trained on, sft/cpt); what ``hwft bench`` times
    steps: list[dict] = field(default_factory=list)

    def log(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def say(self, message: str) -> None:
        """User-facing output (the answers before and after training) on stdout."""
        if not self.quiet:
            print(message, flush=True)
