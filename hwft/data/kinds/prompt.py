"""The prompt kind: prompt turns with an optional reference answer (grpo, ppo), rendered with the
generation prompt; prompts longer than ``max_length`` minus the method's ``max_new_tokens`` are
dropped (counted). A rollout batch is one optimizer step's prompts, reused for the method's
``num_iterations`` steps."""

from __future__ import annotations

from dataclasses import dataclass

from hwft.data.chat import IGNORE_INDEX, ChatRenderer, Tokenized, TokenizeStats
from hwft.data.kinds.chat import Turns
from hwft.data.pipeline import Batches, epochs_of
from hwft.errors import DataError, RecipeError


@dataclass
class PromptExample(Turns):
    """``messages``: the prompt turns; ``reference``: the answer reward functions compare with."""

    kind = "prompt"
    reference: str | None = None

    def prompt_and_reference(self) -> tuple[list[dict], str] | None:
        if self.reference:
            return [{"role": m["role"], "content": m["content"]} for m in self.messages], self.reference
        return None


@dataclass
class Prompt:
    """A prompt ready to sample from: token ids for generation, and what reward functions see."""

    input_ids: list[int]
    text: str  #: the last user turn
    reference: str | None  #: the row's reference answer, if any
    #: an image prompt's processor outputs the forward takes beside the ids (hwft.vision), and
    #: its per-token inputs over ``input_ids``
    inputs: dict | None = None
    token_inputs: dict[str, list[int]] | None = None

    @property
    def sequences(self) -> tuple[Prompt, ...]:
        return (self,)


def prompt_items(
    examples: list[PromptExample], renderer: ChatRenderer, max_prompt_length: int, objective: str
) -> tuple[list[Prompt], TokenizeStats]:
    """Prompt token ids (rendered with the generation prompt); prompts longer than
    ``max_prompt_length`` are dropped (counted). ``objective``: the method whose section sets
    max_new_tokens (named in the message)."""
    stats = TokenizeStats()
    prompts = []
    for example in examples:
        renderer.check(example)
        inputs = token_inputs = None
        if example.media:  # renderer.check refused them where the model reads no images
            from hwft.vision import prompt_inputs

            ids, inputs, token_inputs = prompt_inputs(
                renderer.vision, renderer, example.messages, example.media, example.source
            )
        else:
            ids = renderer.prompt_ids(example.messages, example.tools)
        if len(ids) > max_prompt_length:
            stats.dropped += 1
            continue
        users = [m["content"] for m in example.messages if m["role"] == "user"]
        stats.examples += 1
        stats.tokens += len(ids)
        stats.lengths.append(len(ids))
        prompts.append(Prompt(ids, users[-1] if users else "", example.reference, inputs, token_inputs))
    if not prompts:
        raise DataError(
            f"no prompt left to train on: all {stats.dropped} are longer than train.max_length minus "
            f"method.{objective}.max_new_tokens ({max_prompt_length} tokens); raise train.max_length"
        )
    return prompts, stats


def prompt_batches(data, renderer: ChatRenderer, recipe, ranks: int = 1, capability=None) -> Batches:
    """Micro-batches of prompts; the method's section (method.<objective>) gives
    ``max_new_tokens`` and ``num_iterations``."""
    objective = recipe.method.objective
    section = getattr(recipe.method, objective)
    room = recipe.train.max_length - section.max_new_tokens
    if room < 1:
        raise RecipeError(
            f"train.max_length ({recipe.train.max_length}) leaves no room for a prompt before "
            f"method.{objective}.max_new_tokens ({section.max_new_tokens}); raise train.max_length"
        )
    prompts, stats = prompt_items(data.examples, renderer, room, objective)
    iterator, steps = epochs_of(prompts, recipe, ranks, section.num_iterations)
    return Batches(iterator, steps, stats, prompts, False, unit="prompts")


def inspect(example: PromptExample, renderer: ChatRenderer, max_length: int) -> list[tuple[str, Tokenized]]:
    ids = renderer.prompt_ids(example.messages, example.tools)
    return [(f"prompt (reference: {example.reference!r})", Tokenized(ids, [IGNORE_INDEX] * len(ids)))]
