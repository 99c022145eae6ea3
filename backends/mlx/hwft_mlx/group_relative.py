"""GRPO on MLX: sample a group of completions per prompt with mlx-lm's generation, score them
(:mod:`hwft.rewards`, shared with torch), push the policy toward the better ones of each group
(``hwft_torch.losses.grpo_loss``).

Every ``num_iterations`` optimizer steps a rollout batch is made from the next step's prompts:
each prompt is sampled ``num_generations`` times (``mlx_lm.generate.generate_step`` with
mlx-lm's temperature / top-p sampler, seeded by ``train.seed``); a completion ends at its first
end-of-sequence token, which it keeps. Log-probabilities are then computed on right-padded
``prompt + completion`` rows: causal attention makes the padding after a row's tokens harmless.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from hwft.data.pipeline import Batches
from hwft.distributed import ALONE, Collective
from hwft.methods.grpo import GrpoSpec, score_step
from hwft.objective import Loss
from hwft.rewards import Reward, Sample, write_rollouts
from hwft_mlx.arrays import number
from hwft_mlx.losses import grpo_loss, target_logps
from hwft_mlx.objective import MlxObjective, position_logits


@dataclass
class Rollouts:
    """One micro-batch of completions as right-padded ``prompt + completion`` rows."""

    ids: mx.array  #: (n, W)
    where: mx.array  #: (n, C) flat positions whose logits score each completion token
    targets: mx.array  #: (n, C) completion tokens (0 past the end)
    mask: mx.array  #: (n, C) 1 for real completion tokens, up to and including end-of-sequence
    prompt_tokens: int
    advantages: mx.array | None = None
    old_logps: mx.array | None = None
    ref_logps: mx.array | None = None
    normaliser: float = 1.0


def rollout_arrays(
    prompts: list[list[int]], completions: list[list[int]], pad_id: int, kind: type[Rollouts] = Rollouts
) -> Rollouts:
    """The completions of ``prompts`` as one micro-batch of ``kind`` (ppo's keeps values too)."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    longest = max(1, max(len(c) for c in completions))
    ids = np.full((len(prompts), width), pad_id, dtype=np.int32)
    where = np.zeros((len(prompts), longest), dtype=np.int32)
    targets = np.zeros((len(prompts), longest), dtype=np.int32)
    mask = np.zeros((len(prompts), longest), dtype=np.float32)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids[i, : len(p) + len(c)] = p + c
        n = len(c)
        where[i, :n] = i * width + len(p) - 1 + np.arange(n)  # logits at t predict token t + 1
        targets[i, :n] = c
        mask[i, :n] = 1
    return kind(mx.array(ids), mx.array(where), mx.array(targets), mx.array(mask), sum(len(p) for p in prompts))


def completion_logps(model, r: Rollouts, temperature: float) -> mx.array:
    """(n, C) log-probabilities of the completion tokens at ``temperature``."""
    return target_logps(position_logits(model, r.ids, r.where), r.targets, temperature)


class GroupRelative(MlxObjective):
    def __init__(
        self,
        batches: Batches,
        spec: GrpoSpec,
        accumulation: int,
        tokenizer,
        rewards: dict[str, Reward],
        reference,
        log_path: Path | None,
        eos_ids: list[int],
        collective: Collective = ALONE,
    ):
        super().__init__(batches, collective)
        self.spec, self.accumulation, self.tokenizer = spec, accumulation, tokenizer
        self.span = spec.num_iterations
        self.registered, self.reference, self.log_path, self.eos_ids = rewards, reference, log_path, eos_ids
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.batch: list[Rollouts] = []

    def step(self, model, step: int) -> list[Rollouts]:
        if (step - 1) % self.spec.num_iterations == 0:
            self.batch = self.rollout(model, step)
        return self.batch

    def sample(self, model, prompt: list[int]) -> tuple[list[int], bool]:
        """One completion and whether it ended with an end-of-sequence token."""
        from mlx_lm.generate import generate_step
        from mlx_lm.sample_utils import make_sampler

        g = self.spec
        sampler = make_sampler(temp=g.temperature, top_p=g.top_p if g.top_p < 1 else 0.0)
        tokens: list[int] = []
        for token, _ in generate_step(mx.array(prompt), model, max_tokens=g.max_new_tokens, sampler=sampler):
            tokens.append(int(token))
            if tokens[-1] in self.eos_ids:
                return tokens, True
        return tokens, False

    def sample_step(self, model) -> tuple[list, list, list[Sample]]:
        """This rank's share of the step's prompts, each sampled ``num_generations`` times (eval
        mode): (micro-batches of prompts, their completions, the samples reward functions see)."""
        g = self.spec
        was_training = model.training
        model.eval()
        _, micro = self.draw_step(self.accumulation)  # this rank's share of the step's prompts
        generated = [
            [self.sample(model, p.input_ids) for p in prompts for _ in range(g.num_generations)] for prompts in micro
        ]
        model.train(was_training)
        samples = []
        for prompts, outs in zip(micro, generated, strict=True):
            repeated = [p for p in prompts for _ in range(g.num_generations)]
            samples += [
                Sample(
                    p.text, self.tokenizer.decode(c, skip_special_tokens=True).strip(), p.reference, len(c), not done
                )
                for p, (c, done) in zip(repeated, outs, strict=True)
            ]
        return micro, generated, samples

    def rollout(self, model, step: int) -> list[Rollouts]:
        g = self.spec
        micro, generated, samples = self.sample_step(model)
        scored = score_step(samples, g, self.registered, self.collective)  # over all ranks
        batch, start = [], 0
        for prompts, outs in zip(micro, generated, strict=True):
            rows = [p.input_ids for p in prompts for _ in range(g.num_generations)]
            r = rollout_arrays(rows, [c for c, _ in outs], self.pad_id)
            r.advantages = mx.array(scored.advantages[start : start + len(rows)])
            r.normaliser, start = scored.normaliser, start + len(rows)
            if g.num_iterations > 1:
                r.old_logps = mx.stop_gradient(completion_logps(model, r, g.temperature))
            if g.beta > 0:
                with self.reference.active() as reference_model:
                    r.ref_logps = mx.stop_gradient(completion_logps(reference_model, r, g.temperature))
            mx.eval([a for a in (r.old_logps, r.ref_logps) if a is not None])
            batch.append(r)
        self.note(**scored.scored.metrics)
        write_rollouts(self.log_path, step, scored.scored)
        return batch

    def forward(self, model, r: Rollouts):
        g = self.spec
        assert r.advantages is not None, "set by step()"
        logps = completion_logps(model, r, g.temperature)
        old = r.old_logps if r.old_logps is not None else mx.stop_gradient(logps)
        value, stats = grpo_loss(
            logps,
            old,
            r.ref_logps,
            r.advantages,
            r.mask,
            g.beta,
            g.epsilon,
            g.epsilon_high or g.epsilon,
            g.per_completion,
            r.normaliser,
            g.kl_correction,
        )
        tokens = mx.maximum(stats["tokens"], 1)
        out = {"clip_ratio": stats["clipped"] / tokens}
        if "kl" in stats:
            out["kl"] = stats["kl"] / tokens
        return value, out

    def counts(self, r: Rollouts) -> Loss:
        trained = int(number(r.mask.sum()))
        return Loss(None, r.prompt_tokens + trained, trained)


def build(setup) -> GroupRelative:
    """grpo on MLX (hwft_mlx.methods.Setup -> the objective): the reference is the model with its
    adapters off (lora, qlora) or a frozen copy (full); rank 0 writes rollouts.jsonl."""
    from hwft.plugins import get_host
    from hwft_mlx.adapters import Reference

    job, recipe = setup.job, setup.job.recipe
    spec = recipe.method.grpo
    reference = Reference(setup.model, adapters=recipe.method.adapter) if spec.beta > 0 else None
    rollouts = job.run_dir.path / "rollouts.jsonl" if job.world.main else None
    return GroupRelative(
        setup.batches,
        spec,
        recipe.train.gradient_accumulation_steps,
        setup.tokenizer,
        get_host().rewards(),
        reference,
        rollouts,
        setup.stop,
        setup.collective,
    )
