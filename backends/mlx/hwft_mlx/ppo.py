"""PPO on MLX: rollouts as GRPO's on MLX (:mod:`hwft_mlx.group_relative`, one completion per
prompt), a value head on the policy's last hidden state, the loss of
``hwft_torch.losses.ppo_loss`` (:func:`hwft_mlx.losses.ppo_loss`).

The value head (``v_head``, hidden -> 1, zero at the start) is the objective's extra module
(:data:`hwft.methods.ppo.VALUE_HEAD`): the engine makes it a child of the mlx-lm model, so
``nn.value_and_grad`` trains it with the rest, and saves it as ``value_head.safetensors`` (TRL's
``v_head.summary.*`` names) beside the result and in checkpoints. Advantages and returns come
from :func:`hwft.methods.ppo.rollout_targets`, shared with torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from hwft.methods.ppo import VALUE_HEAD, PpoSpec, rollout_targets, score_samples
from hwft.objective import Loss
from hwft.rewards import ScoredRollouts, write_rollouts
from hwft_mlx.arrays import number
from hwft_mlx.forward import hidden_states, output_logits
from hwft_mlx.group_relative import GroupRelative, Rollouts, completion_logps, rollout_arrays
from hwft_mlx.losses import ppo_loss, target_logps


@dataclass
class ValuedRollouts(Rollouts):
    """GRPO's rollouts with what PPO keeps of the sampling policy besides its log-probabilities."""

    old_values: mx.array | None = None  #: (n, C): the value head's at sampling time
    returns: mx.array | None = None  #: (n, C): GAE's returns


def policy_outputs(model, r: Rollouts, temperature: float) -> tuple[mx.array, mx.array]:
    """(n, C) log-probabilities of the completion tokens and the value head's estimates at the
    positions that predict them."""
    hidden = hidden_states(model, r.ids)
    flat = hidden.reshape(-1, hidden.shape[-1])[r.where]
    logps = target_logps(output_logits(model, flat), r.targets, temperature)
    return logps, model.v_head(flat).squeeze(-1).astype(mx.float32)


class Proximal(GroupRelative):
    spec: PpoSpec

    def rollout(self, model, step: int) -> list[ValuedRollouts]:
        g = self.spec
        micro, generated, samples = self.sample_step(model)
        scores, metrics, everyone, every_score = score_samples(samples, g, self.registered, self.collective)
        batch, arrays, start = [], [], 0
        for prompts, outs in zip(micro, generated, strict=True):
            r = rollout_arrays([p.input_ids for p in prompts], [c for c, _ in outs], self.pad_id, ValuedRollouts)
            assert isinstance(r, ValuedRollouts)
            logps, values = policy_outputs(model, r, g.temperature)
            r.old_logps, r.old_values = mx.stop_gradient(logps), mx.stop_gradient(values)
            with self.reference.active() as reference_model:
                r.ref_logps = mx.stop_gradient(completion_logps(reference_model, r, g.temperature))
            mx.eval(r.old_logps, r.old_values, r.ref_logps)
            arrays.append(
                {
                    "scores": np.array(scores[start : start + len(prompts)], dtype=np.float32),
                    "logps": np.array(r.old_logps),
                    "ref_logps": np.array(r.ref_logps),
                    "values": np.array(r.old_values),
                    "mask": np.array(r.mask),
                }
            )
            start += len(prompts)
            batch.append(r)
        # The step's completion tokens and KL on every rank: each rank's loss is its share of the step's.
        tokens, kl_sum = self.collective.sum(
            [
                float(sum(a["mask"].sum() for a in arrays)),
                sum(float(((a["logps"] - a["ref_logps"]) * a["mask"]).sum()) for a in arrays),
            ]
        )
        for r, (advantages, returns) in zip(batch, rollout_targets(arrays, g, self.collective), strict=True):
            r.advantages, r.returns = mx.array(advantages.astype(np.float32)), mx.array(returns.astype(np.float32))
            r.normaliser = max(tokens, 1.0)
        self.note(kl=kl_sum / max(tokens, 1.0), **metrics)  # every rank notes the whole batch's
        write_rollouts(self.log_path, step, ScoredRollouts(everyone, every_score, [0.0] * len(everyone), metrics))
        return batch

    def forward(self, model, r: ValuedRollouts):
        g = self.spec
        assert r.old_logps is not None and r.old_values is not None, "set by step()"
        assert r.returns is not None and r.advantages is not None, "set by step()"
        logps, values = policy_outputs(model, r, g.temperature)
        value, stats = ppo_loss(
            logps,
            r.old_logps,
            values,
            r.old_values,
            r.returns,
            r.advantages,
            r.mask,
            g.cliprange,
            g.cliprange_value,
            g.vf_coef,
            r.normaliser,
        )
        tokens = mx.maximum(stats["tokens"], 1)
        return value, {
            "clip_ratio": stats["clipped"] / tokens,
            "policy_loss": stats["policy"] / tokens,
            "value_loss": stats["value"] / tokens,
        }

    def counts(self, r: Rollouts) -> Loss:
        trained = int(number(r.mask.sum()))
        return Loss(None, r.prompt_tokens + trained, trained)


def build(setup) -> Proximal:
    """ppo on MLX (hwft_mlx.methods.Setup -> the objective): the reference is the model with its
    adapters off (lora, qlora) or a frozen copy (full), made before the value head, the
    objective's extra, joins it (the engine attaches it)."""
    from hwft.plugins import get_host
    from hwft_mlx.adapters import Reference

    job, recipe = setup.job, setup.job.recipe
    reference = Reference(setup.model, adapters=recipe.method.adapter)
    head = nn.Linear(setup.model.args.hidden_size, 1)
    head.weight, head.bias = mx.zeros_like(head.weight), mx.zeros_like(head.bias)
    rollouts = job.run_dir.path / "rollouts.jsonl" if job.world.main else None
    objective = Proximal(
        setup.batches,
        recipe.method.ppo,
        recipe.train.gradient_accumulation_steps,
        setup.tokenizer,
        get_host().rewards(),
        reference,
        rollouts,
        setup.stop,
        setup.collective,
    )
    objective.extras = (replace(VALUE_HEAD, module=head),)
    return objective
