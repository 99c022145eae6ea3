"""PPO on the torch engine: rollouts as GRPO's (:mod:`hwft_torch.grpo`, one completion per
prompt), a value head on the policy's last hidden state, the loss of
:func:`hwft_torch.losses.ppo_loss`.

Every ``num_iterations`` optimizer steps a rollout batch is sampled; the sampling policy's
log-probabilities and values and the reference's log-probabilities are kept, and
:func:`hwft.methods.ppo.rollout_targets` turns them and the scores into whitened advantages and
returns (engine-neutral, numpy). The value head (``v_head``, hidden -> 1, zero at the start) is
the objective's one extra module (:data:`hwft.methods.ppo.VALUE_HEAD`): the engine attaches it
to the model, so the optimizer steps it with the rest, and saves it as ``value_head.safetensors``
(TRL's and LLaMA-Factory's ``v_head.summary.*`` names) beside the result and in checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import cast

import torch

from hwft.methods.ppo import VALUE_HEAD, PpoSpec, rollout_targets, score_samples
from hwft.objective import Loss
from hwft.rewards import ScoredRollouts, write_rollouts
from hwft_torch.grpo import GroupRelative, Rollouts, completion_logps
from hwft_torch.losses import ppo_loss, target_logps
from hwft_torch.modeling import Reference


@dataclass
class ValuedRollouts(Rollouts):
    """GRPO's rollouts with what PPO keeps of the sampling policy besides its log-probabilities."""

    old_values: torch.Tensor | None = None  #: (n, C): the value head's at sampling time
    returns: torch.Tensor | None = None  #: (n, C): GAE's returns


def policy_outputs(model, r: Rollouts, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, C) log-probabilities of the completion tokens and the value head's estimates at the
    positions that predict them (position ids count real tokens, as generation did)."""
    input_ids = torch.cat([r.prompt_ids, r.completion_ids], dim=1)
    attention_mask = torch.cat([r.prompt_mask, r.completion_mask], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        output_hidden_states=True,
    )
    width = r.completion_ids.shape[1]
    logps = target_logps(out.logits[:, -width - 1 : -1, :], r.completion_ids, temperature)
    hidden = out.hidden_states[-1][:, -width - 1 : -1, :]
    values = model.v_head(hidden.to(model.v_head.weight.dtype)).squeeze(-1).float()
    return logps, values


class Proximal(GroupRelative):
    """PPO-clip: GRPO's sampling, a learned value baseline instead of group statistics."""

    spec: PpoSpec

    rollouts = ValuedRollouts

    def rollout(self, model, step: int) -> list[ValuedRollouts]:
        g = self.spec
        sampled, samples = self.sample_step(model)
        batch = cast(list[ValuedRollouts], sampled)  # sample_step builds self.rollouts
        scores, metrics, everyone, every_score = score_samples(samples, g, self.registered, self.collective)
        arrays, start, kls = [], 0, []
        assert self.reference is not None  # ppo's KL always takes one
        for r in batch:
            n = len(r.completion_ids)
            with torch.no_grad(), self.autocast():
                old_logps, old_values = policy_outputs(model, r, g.temperature)
                with self.reference.active() as reference_model:
                    ref_logps = completion_logps(reference_model, r, g.temperature)
            r.old_logps, r.old_values, r.ref_logps = old_logps, old_values, ref_logps
            arrays.append(
                {
                    "scores": torch.tensor(scores[start : start + n]).numpy(),
                    "logps": old_logps.float().cpu().numpy(),
                    "ref_logps": ref_logps.float().cpu().numpy(),
                    "values": old_values.cpu().numpy(),
                    "mask": r.completion_mask.float().cpu().numpy(),
                }
            )
            kls.append(float(((old_logps - ref_logps) * r.completion_mask).sum()))
            start += n
        # The step's completion tokens and KL on every rank: each rank's loss is its share of the step's.
        kl_sum = sum(kls)
        tokens, kl_sum = self.collective.sum([float(sum(r.completion_mask.sum() for r in batch)), kl_sum])
        for r, (advantages, returns) in zip(batch, rollout_targets(arrays, g, self.collective), strict=True):
            r.advantages = torch.tensor(advantages, device=self.device)
            r.returns = torch.tensor(returns, device=self.device)
            r.normaliser = max(tokens, 1.0)
        self.note(kl=kl_sum / max(tokens, 1.0), **metrics)  # every rank notes the whole batch's
        write_rollouts(self.log_path, step, ScoredRollouts(everyone, every_score, [0.0] * len(everyone), metrics))
        return batch

    def loss(self, model, r: ValuedRollouts) -> Loss:
        g = self.spec
        assert r.old_logps is not None and r.old_values is not None, "set by rollout()"
        assert r.returns is not None and r.advantages is not None, "set by rollout()"
        logps, values = policy_outputs(model, r, g.temperature)
        value, stats = ppo_loss(
            logps,
            r.old_logps,
            values,
            r.old_values,
            r.returns,
            r.advantages,
            r.completion_mask,
            g.cliprange,
            g.cliprange_value,
            g.vf_coef,
            r.normaliser,
        )
        tokens = float(stats["tokens"].clamp(min=1))
        self.note(
            clip_ratio=float(stats["clipped"]) / tokens,
            policy_loss=float(stats["policy"]) / tokens,
            value_loss=float(stats["value"]) / tokens,
        )
        return Loss(value, int(r.prompt_mask.sum()) + int(stats["tokens"]), int(stats["tokens"]))


def build(setup) -> Proximal:
    """ppo on the torch engine (hwft_torch.methods.Setup -> the objective): the reference is
    made from the model as it is; the value head, the objective's extra, joins it after (the
    engine attaches it)."""
    reference = Reference(setup.model)
    head = torch.nn.Linear(setup.model.config.hidden_size, 1)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    objective = Proximal.from_setup(setup, setup.job.recipe.method.ppo, reference)
    objective.extras = (replace(VALUE_HEAD, module=head),)
    return objective
