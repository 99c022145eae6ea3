"""What the core hands to a backend: everything decided and validated before weights load."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hwft.checkpoint import Checkpoint
from hwft.data.batching import Row
from hwft.data.chat import ChatRenderer
from hwft.data.kinds.sequences import held_out_rows
from hwft.data.loading import TrainData
from hwft.data.pipeline import Batches, training_batches
from hwft.distributed import SINGLE, World
from hwft.models import ResolvedModel, load_tokenizer, materialise
from hwft.output import RunDir
from hwft.recipe import Recipe
from hwft.select import Choice
from hwft.vision import VisionInputs


@dataclass
class Inputs:
    """What every engine trains from, made the same way for all: the model folder, its
    tokenizer and chat renderer, the micro-batches, and the held-out rows of data.eval."""

    model_path: Path
    tokenizer: Any
    renderer: ChatRenderer
    batches: Batches
    held_out: list[Row]


@dataclass
class Result:
    """What a run produced: an engine fills it in ``job.results`` (the loop, :mod:`hwft.loop`,
    sets most fields); figures only one engine reports go into ``extra``."""

    final_loss: float | None = None  #: the last step's loss
    steps: int = 0  #: optimizer steps of the run
    output: str | None = None  #: the saved adapter/ or model/ folder
    model: Any = None  #: the trained model, as the engine holds it (bench, tests)
    tuning: str | None = None  #: the tuning that ran (lora where qlora fell back)
    dtype: str | None = None  #: the compute dtype: fp32, bf16, fp16
    peak_memory_bytes: int | None = None  #: the engine's peak memory (device, or process RSS on the CPU)
    answers: list[dict] = field(default_factory=list)  #: eval.prompts answered before and after
    eval_loss: float | None = None  #: the last held-out loss (data.eval, data.val_size)
    #: what else an engine reported (the torch engine on the CPU: memory_before_load_bytes,
    #: memory_load_peak_bytes, memory_shard_bytes, and the anonymous memory before and after
    #: loading, memory_before_load_anonymous_bytes and memory_loaded_anonymous_bytes, which
    #: hwft plan's tests read)
    extra: dict = field(default_factory=dict)


@dataclass
class Job:
    recipe: Recipe
    choice: Choice
    model: ResolvedModel
    data: TrainData  #: the parsed (or streamed) training data
    run_dir: RunDir
    quiet: bool = False
    world: World = SINGLE  #: this process's rank in a multi-process run; rank 0 logs and saves
    resume: Checkpoint | None = None  #: the verified checkpoint to continue from (--resume)
    recipe_hint: str = "RECIPE.yaml"  #: how the user named the recipe, for messages
    results: Result = field(default_factory=Result)  #: what the engine reports (final loss, answers, ...)
    #: one record per optimizer step: step, seconds, tokens (non-padding), trained (label
    #: tokens), attended (causal attention pairs), loss, examples (indices of the tokenised
    #: sequences trained on, sft/cpt); what ``hwft bench`` times
    steps: list[dict] = field(default_factory=list)
    #: the engine's peak memory so far in bytes (device memory, or process RSS on the CPU)
    memory: Callable[[], int | None] | None = None

    def log(self, message: str) -> None:
        if not self.quiet and self.world.main:
            print(message, file=sys.stderr, flush=True)

    def say(self, message: str) -> None:
        """User-facing output (the answers before and after training) on stdout."""
        if not self.quiet and self.world.main:
            print(message, flush=True)

    def inputs(self) -> Inputs:
        """Render, mask all but what the model should say, pack into rows (sft, cpt), pair answers
        (dpo) or collect prompts (grpo): the same rows in the same order on every engine."""
        recipe, t = self.recipe, self.recipe.train
        model_path = materialise(self.model, log=self.log)
        tokenizer = load_tokenizer(model_path, recipe.model.trust_remote_code)
        renderer = ChatRenderer.for_recipe(recipe, tokenizer)
        if self.choice.capability.media:  # an engine that feeds images: the model's processor, if it has one
            renderer.vision = VisionInputs.for_data(model_path, recipe.data)
        batches = training_batches(self.data, renderer, recipe, self.choice.capability, self.world.size)
        self.log(f"data: {batches.summary(t.max_length)}")
        held_out = held_out_rows(self.data.eval_examples, renderer, t.max_length)
        return Inputs(model_path, tokenizer, renderer, batches, held_out)

    def show_answers(self, when: str, answer: Callable[[str], str]) -> list[dict]:
        """Answer each of eval.prompts with ``answer(prompt)`` (an engine's greedy generation),
        print them, and return them as records for the results."""
        answers = []
        for prompt in self.recipe.eval.prompts:
            text = answer(prompt)
            self.say(f"[{when} training] Q: {prompt}\n[{when} training] A: {text}")
            answers.append({"when": when, "prompt": prompt, "answer": text})
        return answers
