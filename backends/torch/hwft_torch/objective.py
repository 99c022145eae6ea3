"""The torch half of the objectives (the shared half is :mod:`hwft.objective`), and the one for
sft and cpt. The loop (:mod:`hwft_torch.engine`) calls ``loss(model, micro)`` under autocast."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from hwft.data.batching import Row, pad
from hwft.data.chat import IGNORE_INDEX
from hwft.data.pipeline import Batches
from hwft.distributed import ALONE, Collective
from hwft.job import Job
from hwft.objective import Loss, Objective, sequence_pairs, step_label_count
from hwft_torch import frozen_weights
from hwft_torch.losses import causal_lm_loss, chunked_cross_entropy, linear_cross_entropy
from hwft_torch.modeling import attention_implementation
from hwft_torch.parallel import sharded


def to_tensors(rows: list[Row], pad_id: int, attention: str, device: torch.device) -> dict[str, torch.Tensor]:
    """Model inputs for a micro-batch, keeping attention within each packed example.

    flash_attention_2 runs padding-free: all rows are concatenated into one sequence and the
    kernel finds the examples from where ``position_ids`` restart (varlen). Other kernels get
    right-padded rows; where a row packs several examples, no attention mask but the position
    ids, from which transformers builds every layer's block-diagonal mask (the model must be
    called with ``use_cache=False``).
    """
    if attention == "flash_attention_2":
        flat = {
            "input_ids": [t for r in rows for t in r.input_ids],
            "labels": [t for r in rows for t in r.labels],
            "position_ids": [p for r in rows for p in r.position_ids],
        }
        return {k: torch.tensor([v], device=device) for k, v in flat.items()}
    batch = {k: torch.tensor(v) for k, v in pad(rows, pad_id).items()}
    if any(len(r.lengths) > 1 for r in rows):
        # No mask: transformers finds the examples where position_ids restart (masking_utils'
        # find_packed_sequence_indices, with no cache: call the model with use_cache=False) and
        # builds each layer's own mask from them: causal within each example, and within the
        # sliding window on the layers that have one (Mistral, Gemma 2/3), which a single mask
        # passed in for every layer could not be.
        del batch["attention_mask"]
    return {k: v.to(device) for k, v in batch.items()}


#: Config attributes that change logits after the output layer (soft-capping, scaling): a
#: model with one set computes more than ``lm_head(hidden)``, so it keeps the plain loss.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def output_head(model) -> tuple[torch.nn.Module, torch.Tensor] | str:
    """(decoder, output weight) where the model's logits are exactly ``hidden @ weight.T`` of its
    decoder's last hidden state; otherwise why not (the fused loss is then skipped)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return f"the output layer is a {type(head).__name__}, not a plain bias-free Linear"
    config = getattr(base, "config", None)
    for attr in LOGIT_TRANSFORMS:
        if getattr(config, attr, None) not in (None, 1, 1.0):
            return f"the model transforms its logits ({attr})"
    try:
        decoder = base.get_decoder()
    except (AttributeError, ValueError):
        decoder = None
    if decoder is None or decoder is base:
        return "the model has no separate decoder"
    return decoder, head.weight


class RouterBalanced:
    """The router load-balancing term (hwft.router_balance) of an objective whose model is an MoE
    one that balances so: ``balance`` is set by :func:`balance_router`, and the objective asks
    its policy forward for ``output_router_logits``."""

    balance = None  #: hwft.router_balance.RouterBalance, or None: no term
    balance_loss = None  #: transformers' load_balancing_loss_func of the model's family

    def router_term(self, router_logits, mask) -> torch.Tensor:
        """coefficient * L_aux / the step's micro-batches (so the step adds the mean); L_aux logged."""
        b = self.balance
        aux = self.balance_loss(router_logits, b.experts, b.top_k, mask)
        self.note(aux_loss=float(aux.detach()))
        return b.coefficient * aux / self.step_micro_batches


class LanguageModelling(RouterBalanced, Objective):
    """sft and cpt: next-token cross-entropy on the label tokens of (packed) rows, normalised by
    the step's label tokens.

    With ``fused`` (decoder, output weight), the loss is :func:`~hwft_torch.losses.linear_cross_entropy`
    on the hidden states of the label positions only: no logits for prompts or padding, and
    never the whole micro-batch's logits at once. Otherwise the model's logits go through
    :func:`~hwft_torch.losses.causal_lm_loss`. Both compute the same number.
    """

    def __init__(self, batches: Batches, accumulation: int, pad_id: int, attention: str, device: torch.device,
                 fused: tuple[torch.nn.Module, torch.Tensor] | None = None, collective: Collective = ALONE,
                 cross_entropy=linear_cross_entropy):
        super().__init__(batches, collective)
        self.accumulation, self.pad_id, self.attention, self.device = accumulation, pad_id, attention, device
        self.fused = fused
        self.step_micro_batches = accumulation
        #: (hidden, weight, targets, num_items, dtype) -> loss: hwft's chunked kernel, or the
        #: applied cross_entropy kernel's (Liger's on CUDA and ROCm)
        self.cross_entropy = cross_entropy

    def step(self, model, step: int) -> list[tuple[list[Row], int]]:
        return self.step_shares(self.accumulation, step_label_count)

    def loss(self, model, micro: tuple[list[Row], int]) -> Loss:
        rows, num_items = micro
        tensors = to_tensors(rows, self.pad_id, self.attention, self.device)
        labels = tensors.pop("labels")
        routed = {"output_router_logits": True} if self.balance is not None else {}
        if self.fused is None:
            out = model(**tensors, use_cache=False, **routed)
            value = causal_lm_loss(out.logits, labels, num_items)
        else:
            decoder, weight = self.fused
            out = decoder(**tensors, use_cache=False, **routed)
            hidden = out.last_hidden_state
            targets = labels[:, 1:]
            keep = targets != IGNORE_INDEX
            dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else None
            value = self.cross_entropy(hidden[:, :-1][keep], weight, targets[keep], num_items, dtype)
        if self.balance is not None:  # hwft.router_balance: L + coefficient * L_aux, L_aux logged
            real = None if self.attention == "flash_attention_2" else \
                torch.tensor(pad(rows, self.pad_id)["attention_mask"], device=value.device)
            value = value + self.router_term(out.router_logits, real)
        return Loss(value, sum(len(r.input_ids) for r in rows), sum(r.num_labels for r in rows),
                    sequence_pairs(rows), tuple(i for r in rows for i in r.ids))


class ChunkedCrossEntropy:
    """Kernel ``hwft_chunked_cross_entropy`` (slot cross_entropy, hwft.kernels): sft and cpt
    take their loss from the decoder's hidden states at the label positions through
    :func:`~hwft_torch.losses.linear_cross_entropy`, when the model's logits are exactly
    ``hidden @ weight.T`` (:func:`output_head`) and the output weight is whole on each rank."""

    name = "chunked cross-entropy"

    def __init__(self, job: Job):
        self.job = job
        self.head: tuple[torch.nn.Module, torch.Tensor] | None = None

    def check(self, model) -> str | None:
        if sharded(self.job.recipe):
            return f"parallel.strategy {self.job.recipe.parallel.strategy} shards the output weight"
        head = output_head(model)
        return head if isinstance(head, str) else None

    def apply(self, model) -> str:
        self.head = output_head(model)
        return ""  # the objective that takes it says so (a method without a cross-entropy does not)

    def loss(self):
        """(hidden, weight, targets, num_items, dtype) -> the mean cross-entropy of the targets."""
        return linear_cross_entropy


def build(setup) -> LanguageModelling:
    """sft and cpt on the torch engine (hwft_torch.methods.Setup -> the objective): the cross-
    entropy kernel the run applied (kernels slot cross_entropy: hwft's chunked one, or Liger's
    fused linear cross-entropy on CUDA and ROCm), on the label positions; else the model's logits."""
    job, runtime = setup.job, setup.runtime
    kernel = setup.kernels.get("cross_entropy") if setup.kernels is not None else None
    head, cross_entropy = None, linear_cross_entropy
    if kernel is not None and kernel.head is not None:
        head, cross_entropy, name = kernel.head, kernel.loss(), kernel.name
        # plugin API 1.0: a DeviceRuntime's own fused linear cross-entropy takes the slot's place
        own = runtime.linear_cross_entropy() if runtime is not None and runtime.linear_cross_entropy else None
        if own is not None:
            cross_entropy, name = own, getattr(own, "name", "the device's fused linear cross-entropy")
        job.log(f"kernels: {name} on the label positions (no full logits)")
    args = (setup.batches, job.recipe.train.gradient_accumulation_steps, setup.tokenizer.pad_token_id,
            attention_implementation(job.recipe), setup.device, head, setup.collective, cross_entropy)
    n = job.recipe.parallel.sequence_parallel
    if n > 1:  # each row's tokens over n ranks (hwft_torch.sequence_parallel)
        from hwft_torch.sequence_parallel import SequenceParallel

        objective = SequenceParallel(*args, n=n, micro_batch_size=job.recipe.train.micro_batch_size)
    else:
        objective = LanguageModelling(*args)
    balance_router(objective, setup.model, job)
    return objective


def balance_router(objective, model, job: Job) -> None:
    """Give an MoE model's objective its router load-balancing loss (hwft.router_balance), with
    transformers' own ``load_balancing_loss_func`` from the model's module."""
    import sys

    from hwft.router_balance import router_balance

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    balance = router_balance(base.config.to_dict())
    function = getattr(sys.modules.get(type(base).__module__), "load_balancing_loss_func", None)
    if balance is None or function is None:
        return
    objective.balance, objective.balance_loss = balance, function
    job.log(f"moe: router load-balancing loss in the {job.recipe.method.objective} loss, coefficient {balance.coefficient:g} "
            f"({balance.experts} experts, top {balance.top_k}); logged as aux_loss")


@torch.no_grad()
def held_out_loss(model, rows: list[Row], pad_id: int, attention: str, device: torch.device,
                  batch_size: int = 4, autocast=None, fused: bool = True) -> float:
    """Mean next-token cross-entropy per label token over ``rows`` (an evaluation set), in eval
    mode: the number an eval_loss reports, comparable between runs that tokenised alike. Where
    the model allows it, logits are computed for the label positions only, a chunk at a time
    (:func:`~hwft_torch.losses.chunked_cross_entropy`), so evaluating never takes more memory
    than training (``fused`` False: the plain loss, for sharded parameters)."""
    was_training = model.training
    model.eval()
    if autocast is None:  # frozen linears stored in bf16 (hwft_torch.frozen_weights) read bf16 inputs
        def autocast():
            return frozen_weights.autocast_for(model, device)
    head = output_head(model) if fused else "off"
    total, count = 0.0, 0
    ordered = sorted(rows, key=lambda r: len(r.input_ids))
    for start in range(0, len(ordered), batch_size):
        batch = ordered[start : start + batch_size]
        tensors = to_tensors(batch, pad_id, attention, device)
        labels = tensors.pop("labels")
        with autocast() if autocast else nullcontext():
            if isinstance(head, str):
                total += float(causal_lm_loss(model(**tensors, use_cache=False).logits, labels, 1))
            else:
                decoder, weight = head
                hidden = decoder(**tensors, use_cache=False).last_hidden_state
                targets = labels[:, 1:]
                keep = targets != IGNORE_INDEX
                total += float(chunked_cross_entropy(hidden[:, :-1][keep], weight, targets[keep]))
        count += sum(r.num_labels for r in batch)
    model.train(was_training)
    return total / max(count, 1)
