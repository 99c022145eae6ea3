"""GRPO: sample a group of completions per prompt, score them, push the policy toward the
better ones of each group (:func:`hwft_torch.losses.grpo_loss`).

Every ``num_iterations`` optimizer steps a rollout batch is made from the next step's prompts:

1. each micro-batch of prompts is repeated ``num_generations`` times, left-padded and sampled
   from the current policy (eval mode, temperature, top-p, ``max_new_tokens``) in one batched
   ``generate``; a completion ends at its first end-of-sequence token, which it keeps;
2. reward functions score the decoded completions; the weighted sum gives each completion's
   reward, and advantages are normalised within each prompt's group (or the batch);
3. with ``num_iterations`` > 1 the sampling policy's log-probabilities are kept (the ratio's
   denominator), and with ``beta`` > 0 the reference's.

The batch then trains ``num_iterations`` steps; from the second, the policy has moved and the
clipped ratio acts. Every rollout is appended to ``rollouts.jsonl`` in the run folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from hwft.data.kinds.prompt import Prompt
from hwft.data.pipeline import Batches
from hwft.distributed import ALONE, Collective
from hwft.methods.grpo import GrpoSpec, score_step
from hwft.models import stop_token_ids
from hwft.objective import Loss, Objective
from hwft.rewards import Reward, Sample, write_rollouts
from hwft_torch.losses import grpo_loss, target_logps
from hwft_torch.modeling import Reference
from hwft_torch.objective import media_tensors


@dataclass
class Rollouts:
    """One micro-batch of completions: prompt rows left-padded, completions right-padded."""

    prompt_ids: torch.Tensor  #: (n, P)
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor  #: (n, C)
    completion_mask: torch.Tensor  #: 1 up to and including the first end-of-sequence token
    finished: torch.Tensor  #: (n,) bool: ended with an end-of-sequence token (not cut off)
    advantages: torch.Tensor | None = None  #: (n,)
    old_logps: torch.Tensor | None = None  #: (n, C), when num_iterations > 1
    ref_logps: torch.Tensor | None = None  #: (n, C), when beta > 0
    normaliser: float = 1.0  #: over the whole step (see grpo_loss)
    #: image prompts' inputs beside the ids of prompt and completion (pixels, grids, per-token
    #: inputs over both: hwft.vision), as the forward takes them
    inputs: dict = field(default_factory=dict)
    positions: bool = True  #: pass position ids counting real tokens (not where the model works out its own)


def completion_logps(model, r: Rollouts, temperature: float) -> torch.Tensor:
    """Per-token log-probabilities of the completion tokens, (n, C), at ``temperature``.

    Position ids count real tokens only, as generation did, so left padding changes nothing
    (a family that works out its own from the mask, Qwen's mRoPE over image prompts, is given
    none); image prompts' pixels go with the ids."""
    input_ids = torch.cat([r.prompt_ids, r.completion_ids], dim=1)
    attention_mask = torch.cat([r.prompt_mask, r.completion_mask], dim=1)
    extra = dict(r.inputs)
    if r.positions:
        extra["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra).logits
    width = r.completion_ids.shape[1]
    return target_logps(logits[:, -width - 1 : -1, :], r.completion_ids, temperature)


def own_positions(model) -> bool:
    """Whether the model is a vision-language family whose forward works out the positions of an
    image prompt itself (hwft.vision.VisionFamily.own_positions)."""
    from hwft.vision import FAMILIES

    family = FAMILIES.get(getattr(model.config, "model_type", ""))
    return family is not None and family.own_positions


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


class GroupRelative(Objective):
    rollouts: type[Rollouts] = Rollouts  #: what a micro-batch of completions is made as (ppo: with values)

    def __init__(
        self,
        batches: Batches,
        spec: GrpoSpec,
        accumulation: int,
        tokenizer,
        rewards: dict[str, Reward],
        device: torch.device,
        reference: Reference | None,
        log_path: Path | None,
        autocast,
        collective: Collective = ALONE,
        synced: bool = False,
        own_positions: bool = False,
    ):
        super().__init__(batches, collective)
        self.synced = synced  #: generate in lockstep with the other ranks (sharded parameters)
        self.spec, self.accumulation, self.tokenizer = spec, accumulation, tokenizer
        self.span = spec.num_iterations
        self.registered, self.device, self.reference = rewards, device, reference
        self.log_path, self.autocast = log_path, autocast
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = stop_token_ids(tokenizer)
        self.batch: list[Rollouts] = []
        #: the model is a vision-language family whose forward works out its own positions (hwft.vision)
        self.own_positions = own_positions

    @classmethod
    def from_setup(cls, setup, spec, reference: Reference | None):
        """The objective on what the torch engine's loop prepared (hwft_torch.methods.Setup):
        the registered rewards, rollouts.jsonl written by rank 0, and sharded parameters
        generating in lockstep on every rank."""
        from hwft.plugins import get_host
        from hwft_torch.parallel import sharded

        job, recipe = setup.job, setup.job.recipe
        return cls(
            setup.batches,
            spec,
            recipe.train.gradient_accumulation_steps,
            setup.tokenizer,
            get_host().rewards(),
            setup.device,
            reference,
            job.run_dir.path / "rollouts.jsonl" if job.world.main else None,
            setup.autocast,
            setup.collective,
            synced=sharded(recipe),
            own_positions=own_positions(setup.model),
        )

    def step(self, model, step: int) -> list[Rollouts]:
        if (step - 1) % self.spec.num_iterations == 0:
            self.batch = self.rollout(model, step)
        return self.batch

    # ------------------------------------------------------------------ rollouts

    @torch.no_grad()
    def generate(self, model, prompts: list[Prompt]) -> Rollouts:
        g = self.spec
        repeated = [p for p in prompts for _ in range(g.num_generations)]
        prompt_ids, prompt_mask = left_pad([p.input_ids for p in repeated], self.pad_id, self.device)
        media = {k: v.to(self.device) for k, v in media_tensors(repeated, prompt_ids.shape[1], left=True).items()}
        with self.autocast():
            out = model.generate(
                input_ids=prompt_ids,
                attention_mask=prompt_mask,
                **media,
                do_sample=True,
                temperature=g.temperature,
                top_p=g.top_p,
                top_k=0,
                max_new_tokens=g.max_new_tokens,
                eos_token_id=self.eos_ids,
                pad_token_id=self.pad_id,
                synced_gpus=self.synced,
                use_cache=True,  # the training model's config has it off (hwft_torch.modeling.load_model)
            )
        completion = out[:, prompt_ids.shape[1] :]
        is_eos = torch.isin(completion, torch.tensor(self.eos_ids, device=completion.device))
        # Keep tokens up to and including the first end-of-sequence token.
        after = (is_eos.cumsum(-1) - is_eos.long()) > 0
        mask = (~after).long()
        completion = completion.masked_fill(after, self.pad_id)
        # The per-token inputs span the completion too (0: text), for the log-probabilities' forward.
        per_token = set(next((p.token_inputs for p in repeated if p.token_inputs), {}))
        whole = {
            k: torch.cat([v, v.new_zeros(len(v), completion.shape[1])], dim=1) if k in per_token else v
            for k, v in media.items()
        }
        positions = not (media and self.own_positions)
        return self.rollouts(
            prompt_ids, prompt_mask, completion, mask, is_eos.any(-1), inputs=whole, positions=positions
        )

    def sample_step(self, model) -> tuple[list[Rollouts], list[Sample]]:
        """This rank's share of the step's prompts, sampled (eval mode), and the completions as
        reward functions see them (ppo's rollouts too)."""
        g = self.spec
        was_training = model.training
        model.eval()
        _, micro = self.draw_step(self.accumulation)  # this rank's share of the step's prompts
        with self.whole_model():
            batch = [self.generate(model, prompts) for prompts in micro]
        model.train(was_training)
        samples = []
        for prompts, r in zip(micro, batch, strict=True):
            texts = self.tokenizer.batch_decode(r.completion_ids, skip_special_tokens=True)
            lengths = r.completion_mask.sum(-1).tolist()
            repeated = [p for p in prompts for _ in range(g.num_generations)]
            samples += [
                Sample(p.text, text.strip(), p.reference, n, not done)
                for p, text, n, done in zip(repeated, texts, lengths, r.finished.tolist(), strict=True)
            ]
        return batch, samples

    def rollout(self, model, step: int) -> list[Rollouts]:
        g = self.spec
        batch, samples = self.sample_step(model)
        # Rewards, per completion, then advantages over all ranks (engine-neutral: hwft.rewards).
        scored = score_step(samples, g, self.registered, self.collective)
        advantages = torch.tensor(scored.advantages, dtype=torch.float32, device=self.device)
        start = 0
        for r in batch:
            n = len(r.completion_ids)
            r.advantages, start = advantages[start : start + n], start + n
            r.normaliser = scored.normaliser
            with torch.no_grad(), self.autocast():
                if g.num_iterations > 1:
                    r.old_logps = completion_logps(model, r, g.temperature)
                if g.beta > 0:
                    assert self.reference is not None  # made where beta > 0
                    with self.reference.active() as reference_model:
                        r.ref_logps = completion_logps(reference_model, r, g.temperature)
        self.note(**scored.scored.metrics)
        write_rollouts(self.log_path, step, scored.scored)
        return batch

    # ------------------------------------------------------------------ loss

    def loss(self, model, r: Rollouts) -> Loss:
        g = self.spec
        assert r.advantages is not None, "set by rollout()"
        logps = completion_logps(model, r, g.temperature)
        old = r.old_logps if r.old_logps is not None else logps.detach()
        value, stats = grpo_loss(
            logps,
            old,
            r.ref_logps,
            r.advantages,
            r.completion_mask,
            g.beta,
            g.epsilon,
            g.epsilon_high or g.epsilon,
            g.per_completion,
            r.normaliser,
            g.kl_correction,
        )
        tokens = float(stats["tokens"].clamp(min=1))
        self.note(clip_ratio=float(stats["clipped"]) / tokens)
        if "kl" in stats:
            self.note(kl=float(stats["kl"]) / tokens)
        return Loss(value, int(r.prompt_mask.sum()) + int(stats["tokens"]), int(stats["tokens"]))


def build(setup) -> GroupRelative:
    """grpo on the torch engine (hwft_torch.methods.Setup -> the objective): a frozen reference
    where beta > 0."""
    spec = setup.job.recipe.method.grpo
    return GroupRelative.from_setup(setup, spec, Reference(setup.model) if spec.beta > 0 else None)
