"""The router's load-balancing loss of a mixture-of-experts model, as part of the training loss.

An MoE layer's router gives each token a probability over E experts and sends it to the top k.
Left alone, training can send most tokens to a few experts. Switch Transformer's auxiliary loss
(Fedus et al., eqs. 4-6; transformers' ``load_balancing_loss_func``, which Mixtral and
Qwen3-MoE train with) pushes back. Over the N real tokens of a micro-batch and all MoE layers::

    f_e = (1/N) * #{(token, layer) : e among the token's top-k experts}   (no gradient)
    P_e = (1/N) * sum over (token, layer) of softmax(router logits)_e
    L_aux = E * sum_e f_e * P_e

It is k when routing is uniform and grows as it concentrates. The step's loss is the method's
(sft, cpt, dpo, orpo, simpo, kto; of the policy's forward on the trained answers) plus ``router_aux_loss_coef * L_aux``,
averaged over the step's micro-batches, and ``aux_loss`` (L_aux) is logged. Padding is left out
of N. rm, grpo and ppo do not add it.

A model balances this way where its config sets ``router_aux_loss_coef`` above 0. DeepSeek-V3
balances with a per-expert bias in its routing instead and has no such loss. The torch engine
takes the router logits transformers records (``output_router_logits``) into transformers' own
function; MLX, whose mlx-lm models keep no router logits, records its gates' outputs and
computes the same (``hwft_mlx.losses.load_balancing_loss``, held to transformers' to 1e-6 in
tests/test_families.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RouterBalance:
    coefficient: float  #: router_aux_loss_coef
    experts: int  #: E
    top_k: int  #: k


def router_balance(config: dict) -> RouterBalance | None:
    """The load-balancing loss a config.json asks for, or None (a dense model, a coefficient of
    0, or a model that balances otherwise)."""
    coefficient = config.get("router_aux_loss_coef")
    experts = next(
        (config[k] for k in ("num_local_experts", "num_experts", "n_routed_experts") if isinstance(config.get(k), int)),
        None,
    )
    top_k = config.get("num_experts_per_tok")
    if not coefficient or not experts or not top_k:
        return None
    return RouterBalance(float(coefficient), int(experts), int(top_k))
