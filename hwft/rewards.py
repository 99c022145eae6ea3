"""Reward functions for GRPO: plugins register them by name, recipes combine them with weights.

A reward function takes the rollouts of a batch and returns one float per rollout::

    def my_reward(samples: list[Sample], **args) -> list[float]: ...

``args`` are the recipe's ``method.grpo.rewards[i].args``. Plugins register functions through the
``hwft_register_rewards`` hook (``register(name, function, description="")``), exactly as the
built-ins below are registered. Rewards are plain Python on strings, shared by every engine. A
function may carry a ``check(**args)`` attribute, called with the recipe's args before any
weight loads, that raises a RecipeError for args it cannot use (``reward_model``: a path that
is not a reward model).

The summed reward of rollout i is ``sum_k weight_k * reward_k(i)``; each function's mean and
standard deviation are logged as ``rewards/<name>/mean`` and ``rewards/<name>/std``.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pluggy

from hwft.errors import RecipeError, did_you_mean

if TYPE_CHECKING:
    from hwft.inference import Session

hookimpl = pluggy.HookimplMarker("hwft")


@dataclass(frozen=True)
class Sample:
    """One rollout as a reward function sees it."""

    prompt: str  #: the prompt's last user turn (or its text)
    completion: str  #: the generated text, special tokens removed
    reference: str | None  #: the row's reference answer, if it has one
    completion_tokens: int  #: generated tokens, end-of-sequence included
    truncated: bool  #: stopped by max_new_tokens rather than by the end-of-sequence token


RewardFunction = Callable[..., list[float]]


@dataclass(frozen=True)
class Reward:
    name: str
    function: RewardFunction
    description: str = ""


# --------------------------------------------------------------------------------------------
# Built-ins

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_MARKER = re.compile(r"(?:####|answer\s*(?:is|:))\s*(.+)", re.IGNORECASE)


def final_answer(text: str) -> str | None:
    """The final answer in a completion or a reference: the content of the last ``<answer>``
    tag or ``\\boxed{}``, else what follows the last ``####`` or "answer:"/"answer is", else
    the last number, else the whole stripped text."""
    for pattern in (_ANSWER_TAG, _BOXED, _MARKER):
        found = pattern.findall(text)
        if found:
            return found[-1].strip()
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1]
    return text.strip() or None


def normalise_answer(answer: str | None) -> str | None:
    """Comparable form: lower case, no surrounding punctuation, numbers without separators
    (``"1,000.0"`` and ``"1000"`` compare equal)."""
    if answer is None:
        return None
    text = answer.strip().strip(".!?;:$ ").lower()
    number = _NUMBER.fullmatch(text)
    if number:
        value = float(text.replace(",", ""))
        return str(int(value)) if value.is_integer() else str(value)
    return " ".join(text.split())


def exact_match(samples: list[Sample]) -> list[float]:
    """1.0 where the completion's final answer equals the reference's, else 0.0 (see
    :func:`final_answer`); rows without a reference score 0."""
    out = []
    for s in samples:
        want = normalise_answer(final_answer(s.reference)) if s.reference else None
        got = normalise_answer(final_answer(s.completion))
        out.append(1.0 if want is not None and got == want else 0.0)
    return out


def format_reward(samples: list[Sample], pattern: str = r"^<think>.*?</think>\s*<answer>.*?</answer>$") -> list[float]:
    """1.0 where the whole stripped completion matches the regular expression ``pattern``
    (default: a ``<think>`` block followed by an ``<answer>`` block), else 0.0."""
    regex = re.compile(pattern, re.DOTALL)
    return [1.0 if regex.fullmatch(s.completion.strip()) else 0.0 for s in samples]


def length_penalty(samples: list[Sample], target: int = 32, limit: int | None = None) -> list[float]:
    """0 up to ``target`` completion tokens, falling linearly to -1 at ``limit`` (default 4 x
    target) and beyond; a completion cut off by max_new_tokens scores -1."""
    limit = limit if limit is not None else 4 * target
    span = max(limit - target, 1)
    out = []
    for s in samples:
        if s.truncated:
            out.append(-1.0)
        else:
            out.append(-min(max(s.completion_tokens - target, 0) / span, 1.0))
    return out


_SESSIONS: dict[tuple[str, str], Session] = {}


def reward_model(samples: list[Sample], path: str, backend: str = "auto", batch_size: int = 8) -> list[float]:
    """The reward a trained reward model (objective rm: its run folder, or the run's adapter/
    or model/, relative to the working directory) gives each completion as the answer to its
    prompt, the conversation rendered with that model's chat template. Loaded once per run."""
    from hwft.inference import inference_backends, open_session
    from hwft.plugins import get_host

    key = (str(path), backend)
    if key not in _SESSIONS:
        trained = _reward_model_at(path)
        if backend == "auto":  # the best available torch backend: torch sessions score
            host = get_host()
            backend = next((b for b in inference_backends(host) if host.backend(b).engine == "torch"), "cpu")
        _SESSIONS[key] = open_session(trained, backend)
    session = _SESSIONS[key]
    ids = [
        session.conversation_ids(
            [{"role": "user", "content": s.prompt}, {"role": "assistant", "content": s.completion}]
        )
        for s in samples
    ]
    return session.rewards(ids, batch_size)


def _reward_model_at(path: str, **_):
    """The trained reward model at ``path``, or a RecipeError saying why it is not one."""
    from hwft.errors import UserError
    from hwft.inference import open_trained

    try:
        trained = open_trained(path)
    except UserError as exc:
        raise RecipeError(f"reward reward_model: args.path {path}: {exc}") from None
    if trained.head != "score":
        raise RecipeError(f"reward reward_model: {path} is not a reward model (train one with objective rm)")
    return trained


#: Checked with the recipe, before any weight loads: the path names a reward model.
reward_model.check = _reward_model_at


BUILTIN_REWARDS = (
    Reward("exact_match", exact_match, "1 if the final answer equals the row's reference answer"),
    Reward("format", format_reward, "1 if the completion matches args.pattern (default <think>..<answer>..)"),
    Reward("length_penalty", length_penalty, "0 up to args.target tokens, down to -1 at args.limit"),
    Reward("reward_model", reward_model, "the score of a trained reward model (objective rm) at args.path"),
)


@hookimpl
def hwft_register_rewards(register):
    for reward in BUILTIN_REWARDS:
        register(reward.name, reward.function, description=reward.description)


# --------------------------------------------------------------------------------------------
# Registry and scoring


def collect_rewards(pm: pluggy.PluginManager) -> dict[str, Reward]:
    found: dict[str, Reward] = {}

    def register(name: str, function: RewardFunction, description: str = "") -> None:
        if name in found:
            raise RecipeError(f"reward '{name}' is registered twice; disable one plugin with HWFT_DISABLE_PLUGINS")
        found[name] = Reward(name, function, description)

    pm.hook.hwft_register_rewards(register=register)
    return found


def check_rewards(specs, registered: dict[str, Reward], objective: str) -> None:
    """Refuse unknown reward names before any weight loads (``objective``: the method whose
    section, method.<objective>.rewards, names them)."""
    if not specs:
        raise RecipeError(
            f"objective {objective} needs at least one reward in method.{objective}.rewards "
            f"(registered: {', '.join(sorted(registered))})"
        )
    for i, spec in enumerate(specs):
        if spec.name not in registered:
            raise RecipeError(
                f"method.{objective}.rewards[{i}]: unknown reward '{spec.name}'"
                f"{did_you_mean(spec.name, list(registered))} (registered: {', '.join(sorted(registered))})"
            )
        function = registered[spec.name].function
        signature = inspect.signature(function)
        try:
            signature.bind([], **spec.args)
        except TypeError as exc:
            takes = [p for p in list(signature.parameters)[1:]]
            raise RecipeError(
                f"method.{objective}.rewards[{i}]: reward '{spec.name}' does not take args {spec.args}: {exc} "
                f"(it takes: {', '.join(takes) or 'no args'})"
            ) from None
        if callable(getattr(function, "check", None)):  # a reward's own check of its args
            function.check(**spec.args)


def score(samples: list[Sample], specs, registered: dict[str, Reward]) -> tuple[list[float], dict[str, list[float]]]:
    """The weighted total per sample, and each function's raw rewards by name."""
    per_function: dict[str, list[float]] = {}
    total = [0.0] * len(samples)
    for spec in specs:
        values = [float(v) for v in registered[spec.name].function(samples, **spec.args)]
        if len(values) != len(samples):
            raise RecipeError(f"reward '{spec.name}' returned {len(values)} values for {len(samples)} completions")
        per_function[spec.name] = values
        total = [t + spec.weight * v for t, v in zip(total, values, strict=True)]
    return total, per_function


@dataclass
class ScoredRollouts:
    """One rollout batch, scored: what both engines' GRPO objectives train on and log."""

    samples: list[Sample]
    rewards: list[float]  #: the weighted total per completion
    advantages: list[float]  #: per completion, see :func:`advantages`
    metrics: dict[
        str, float
    ]  #: reward, reward_std, frac_reward_zero_std, completion_length, truncated, rewards/<name>/{mean,std}


def write_rollouts(path, step: int, scored: ScoredRollouts) -> None:
    """Append a rollout batch to rollouts.jsonl (one line per completion)."""
    if path is None:
        return
    with open(path, "a", encoding="utf-8") as f:
        for s, reward in zip(scored.samples, scored.rewards, strict=True):
            f.write(
                json.dumps(
                    {
                        "step": step,
                        "prompt": s.prompt,
                        "completion": s.completion,
                        "reference": s.reference,
                        "reward": reward,
                    }
                )
                + "\n"
            )
