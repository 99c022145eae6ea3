"""What the torch engine's objectives share (the engine-neutral half is :mod:`hwft.objective`):
model inputs of a micro-batch of rows, the output head the fused loss reads, the router's
load-balancing term, the chunked cross-entropy kernel and the held-out loss. The loop
(:mod:`hwft_torch.engine`) calls an objective's ``loss(model, micro)`` under autocast; sft's and
cpt's is :mod:`hwft_torch.language_modelling`."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from functools import partial

import torch

from hwft.data.batching import Row, pad
from hwft.data.chat import IGNORE_INDEX
from hwft.job import Job
from hwft.objective import Objective
from hwft.router_balance import RouterBalance
from hwft_torch import frozen_weights
from hwft_torch.losses import causal_lm_loss, chunked_cross_entropy, linear_cross_entropy
from hwft_torch.parallel import sharded
from hwft_torch.unwrap import base_model


def to_tensors(
    rows: list[Row], pad_id: int, attention: str, device: torch.device, model=None
) -> dict[str, torch.Tensor]:
    """Model inputs for a micro-batch, keeping attention within each packed example.

    flash_attention_2 runs padding-free: all rows are concatenated into one sequence and the
    kernel finds the examples from where ``position_ids`` restart (varlen). Other kernels get
    right-padded rows; where a row packs several examples, no attention mask but the position
    ids, from which transformers builds every layer's block-diagonal mask (the model must be
    called with ``use_cache=False``). Packed rows with images or videos also get each example's
    own 3-D positions from ``model`` (hwft_torch.media_packing).
    """
    if attention == "flash_attention_2" and not any(r.inputs for r in rows):
        flat = {
            "input_ids": [t for r in rows for t in r.input_ids],
            "labels": [t for r in rows for t in r.labels],
            "position_ids": [p for r in rows for p in r.position_ids],
        }
        return {k: torch.tensor([v], device=device) for k, v in flat.items()}
    batch = {k: torch.tensor(v) for k, v in pad(rows, pad_id).items()}
    if any(r.inputs for r in rows):
        # Rows with images or videos (hwft.vision): unpacked, the model places each row's tokens
        # itself (Qwen's 3-D mRoPE from the grids), so no position ids; packed, each example's
        # own positions from the model's rule (hwft_torch.media_packing).
        batch.update(media_tensors(rows, batch["input_ids"].shape[1]))
        if any(len(r.lengths) > 1 for r in rows):
            from hwft_torch.media_packing import packed_positions

            types = next(k for r in rows if r.token_inputs for k in r.token_inputs)
            batch["position_ids"] = packed_positions(model, rows, batch, types)
        else:
            del batch["position_ids"]
    elif model is not None and any(len(r.lengths) > 1 for r in rows):
        from hwft_torch.media_packing import rope_index

        if rope_index(model) is not None:
            # Packed text rows of a Qwen VL model: its 3-D positions are the text positions, and
            # the text ones go first so that its mask keeps the examples apart (media_packing).
            batch["position_ids"] = batch["position_ids"][None].expand(4, -1, -1)
    if any(len(r.lengths) > 1 for r in rows):
        # No mask: transformers finds the examples where position_ids restart (masking_utils'
        # find_packed_sequence_indices, with no cache: call the model with use_cache=False) and
        # builds each layer's own mask from them: causal within each example, and within the
        # sliding window on the layers that have one (Mistral, Gemma 2/3), which a single mask
        # passed in for every layer could not be.
        del batch["attention_mask"]
    return {k: v.to(device) for k, v in batch.items()}


def media_tensors(rows: list, width: int, left: bool = False) -> dict[str, torch.Tensor]:
    """What the forward takes beside the ids of rows with images (hwft.vision): each input
    concatenated over the rows in their order, as the processor would have for the batch (rows
    whose images differ in size zero-padded at the end of each dimension to the largest, as
    Pixtral's processor pads a batch), and the per-token inputs padded to ``width`` with 0 (a
    text row's: all 0), on the right, or on the ``left`` as prompts to generate from are.
    ``rows``: anything with ``input_ids``, ``inputs`` and ``token_inputs`` (a Row, a Prompt)."""
    media = [r.inputs for r in rows if r.inputs]
    if not media:
        return {}
    keys = dict.fromkeys(key for m in media for key in m)  # a row's images, another's videos: each over its rows
    out = {key: torch.cat(padded_to_largest([torch.as_tensor(m[key]) for m in media if key in m])) for key in keys}
    for key in next((r.token_inputs for r in rows if r.token_inputs), {}):
        values = [(r.token_inputs or {}).get(key, [0] * len(r.input_ids)) for r in rows]
        out[key] = torch.tensor([[0] * (width - len(v)) + v if left else v + [0] * (width - len(v)) for v in values])
    return out


def padded_to_largest(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` zero-padded at the end of every dimension but the first to the largest size
    among them (unchanged where they agree already)."""
    largest = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    out = []
    for t in tensors:
        pad = [p for d in reversed(range(1, t.dim())) for p in (0, largest[d - 1] - t.shape[d])]
        out.append(torch.nn.functional.pad(t, pad) if any(pad) else t)
    return out


#: Config attributes that change logits after the output layer (soft-capping, scaling): a
#: model with one set computes more than ``lm_head(hidden)``, so it keeps the plain loss.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def output_head(model) -> tuple[torch.nn.Module, torch.Tensor] | str:
    """(decoder, output weight) where the model's logits are exactly ``hidden @ weight.T`` of its
    decoder's last hidden state; otherwise why not (the fused loss is then skipped)."""
    base = base_model(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return f"the output layer is a {type(head).__name__}, not a plain bias-free Linear"
    config = getattr(base, "config", None)
    for attr in LOGIT_TRANSFORMS:
        if getattr(config, attr, None) not in (None, 1, 1.0):
            return f"the model transforms its logits ({attr})"
    try:
        # A vision-language model's decoder is its multimodal backbone (``model``): it merges
        # the images' features into the token embeddings; its get_decoder() is the language
        # model alone, which takes no pixels.
        decoder = base.model if getattr(base.config, "vision_config", None) is not None else base.get_decoder()
    except (AttributeError, ValueError):
        decoder = None
    if decoder is None or decoder is base:
        return "the model has no separate decoder"
    return decoder, head.weight


class RouterBalanced(Objective):
    """The router load-balancing term (hwft.router_balance) of an objective whose model is an MoE
    one that balances so: ``balance`` is set by :func:`balance_router`, and the objective asks
    its policy forward for ``output_router_logits``."""

    balance: RouterBalance | None = None  #: None: no term
    balance_loss: Callable | None = None  #: transformers' load_balancing_loss_func of the model's family

    def router_term(self, router_logits, mask) -> torch.Tensor:
        """coefficient * L_aux / the step's micro-batches (so the step adds the mean); L_aux logged."""
        b = self.balance
        assert b is not None and self.balance_loss is not None, "set by balance_router"
        aux = self.balance_loss(router_logits, b.experts, b.top_k, mask)
        self.note(aux_loss=float(aux.detach()))
        return b.coefficient * aux / self.step_micro_batches


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
        head = output_head(model)
        assert not isinstance(head, str), head  # check() found it
        self.head = head
        return ""  # the objective that takes it says so (a method without a cross-entropy does not)

    def loss(self):
        """(hidden, weight, targets, num_items, dtype) -> the mean cross-entropy of the targets."""
        return linear_cross_entropy


def balance_router(objective, model, job: Job) -> None:
    """Give an MoE model's objective its router load-balancing loss (hwft.router_balance), with
    transformers' own ``load_balancing_loss_func`` from the model's module."""
    import sys

    from hwft.router_balance import router_balance

    base = base_model(model)
    balance = router_balance(base.config.to_dict())
    function = getattr(sys.modules.get(type(base).__module__), "load_balancing_loss_func", None)
    if balance is None or function is None:
        return
    objective.balance, objective.balance_loss = balance, function
    job.log(
        f"moe: router load-balancing loss in the {job.recipe.method.objective} loss, "
        f"coefficient {balance.coefficient:g} "
        f"({balance.experts} experts, top {balance.top_k}); logged as aux_loss"
    )


@torch.no_grad()
def held_out_loss(
    model,
    rows: list[Row],
    pad_id: int,
    attention: str,
    device: torch.device,
    batch_size: int = 4,
    autocast=None,
    fused: bool = True,
) -> float:
    """Mean next-token cross-entropy per label token over ``rows`` (an evaluation set), in eval
    mode: the number an eval_loss reports, comparable between runs that tokenised alike. Where
    the model allows it, logits are computed for the label positions only, a chunk at a time
    (:func:`~hwft_torch.losses.chunked_cross_entropy`), so evaluating never takes more memory
    than training (``fused`` False: the plain loss, for sharded parameters)."""
    was_training = model.training
    model.eval()
    if autocast is None:  # frozen linears stored in bf16 (hwft_torch.frozen_weights) read bf16 inputs
        autocast = partial(frozen_weights.autocast_for, model, device)

    head = output_head(model) if fused else "off"
    total, count = 0.0, 0
    ordered = sorted(rows, key=lambda r: len(r.input_ids))
    for start in range(0, len(ordered), batch_size):
        batch = ordered[start : start + batch_size]
        tensors = to_tensors(batch, pad_id, attention, device, model)
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
