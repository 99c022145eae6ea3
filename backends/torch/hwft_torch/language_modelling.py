"""sft and cpt on the torch engine: next-token cross-entropy on the label tokens of (packed)
rows, normalised by the step's label tokens (:func:`hwft_torch.losses.causal_lm_loss`), and the
same with each row's tokens split over ranks (:class:`SequenceParallel`, the maths in
:mod:`hwft_torch.sequence_parallel`)."""

from __future__ import annotations

import torch

from hwft.data.batching import Row, pad
from hwft.data.chat import IGNORE_INDEX
from hwft.data.pipeline import Batches
from hwft.distributed import ALONE, Collective, World
from hwft.objective import Loss, Objective, sequence_pairs, step_label_count
from hwft_torch.losses import causal_lm_loss, linear_cross_entropy
from hwft_torch.modeling import attention_implementation
from hwft_torch.objective import RouterBalanced, balance_router, to_tensors


class LanguageModelling(RouterBalanced, Objective):
    """sft and cpt: next-token cross-entropy on the label tokens of (packed) rows, normalised by
    the step's label tokens.

    With ``fused`` (decoder, output weight), the loss is :func:`~hwft_torch.losses.linear_cross_entropy`
    on the hidden states of the label positions only: no logits for prompts or padding, and
    never the whole micro-batch's logits at once. Otherwise the model's logits go through
    :func:`~hwft_torch.losses.causal_lm_loss`. Both compute the same number.
    """

    def __init__(
        self,
        batches: Batches,
        accumulation: int,
        pad_id: int,
        attention: str,
        device: torch.device,
        fused: tuple[torch.nn.Module, torch.Tensor] | None = None,
        collective: Collective = ALONE,
        cross_entropy=linear_cross_entropy,
    ):
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
        tensors = to_tensors(rows, self.pad_id, self.attention, self.device, model)
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
            dtype = (
                torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else None
            )
            value = self.cross_entropy(hidden[:, :-1][keep], weight, targets[keep], num_items, dtype)
        if self.balance is not None:  # hwft.router_balance: L + coefficient * L_aux, L_aux logged
            real = (
                None
                if self.attention == "flash_attention_2"
                else torch.tensor(pad(rows, self.pad_id)["attention_mask"], device=value.device)
            )
            value = value + self.router_term(out.router_logits, real)
        return Loss(
            value,
            sum(len(r.input_ids) for r in rows),
            sum(r.num_labels for r in rows),
            sequence_pairs(rows),
            tuple(i for r in rows for i in r.ids),
        )


class SequenceParallel(LanguageModelling):
    """sft and cpt with each micro-batch's tokens split over ``n`` ranks (see the module's doc)."""

    def __init__(self, *args, n: int, micro_batch_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        whole = self.collective.world
        self.n, self.micro_batch_size = n, micro_batch_size
        self.part = whole.rank % n  #: which 1/n of each row this rank trains
        # The data ranks: the ranks of one group draw the same micro-batches.
        self.world = World(whole.rank // n, whole.size // n, whole.local_rank, whole.launcher)

    def split(self, rows: list[Row]) -> dict[str, torch.Tensor]:
        """This rank's 1/n of the micro-batch: input ids, global position ids, and the labels
        shifted before the split (each position holds the token it predicts)."""
        rows = rows + [Row([self.pad_id], [IGNORE_INDEX], [1])] * (self.micro_batch_size - len(rows))
        batch = pad(rows, self.pad_id)
        ids, labels = torch.tensor(batch["input_ids"]), torch.tensor(batch["labels"])
        real = torch.tensor(batch["attention_mask"])
        width = -(-ids.shape[1] // self.n) * self.n
        ids = torch.nn.functional.pad(ids, (0, width - ids.shape[1]), value=self.pad_id)
        labels = torch.nn.functional.pad(labels, (0, width - labels.shape[1]), value=IGNORE_INDEX)
        real = torch.nn.functional.pad(real, (0, width - real.shape[1]), value=0)
        targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
        positions = torch.arange(width).expand_as(ids)
        share = slice(self.part * width // self.n, (self.part + 1) * width // self.n)
        return {
            "input_ids": ids[:, share].to(self.device),
            "position_ids": positions[:, share].to(self.device),
            "targets": targets[:, share].to(self.device),
            "real": real[:, share],
        }

    def loss(self, model, micro: tuple[list[Row], int]) -> Loss:
        rows, num_items = micro
        tensors = self.split(rows)
        targets, real = tensors.pop("targets"), tensors.pop("real")
        keep = targets != IGNORE_INDEX
        if self.fused is None:
            logits = model(**tensors, use_cache=False).logits
            value = torch.nn.functional.cross_entropy(logits[keep].float(), targets[keep], reduction="sum") / num_items
        else:
            decoder, weight = self.fused
            hidden = decoder(**tensors, use_cache=False).last_hidden_state
            dtype = (
                torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else None
            )
            value = self.cross_entropy(hidden[keep], weight, targets[keep], num_items, dtype)
        ids = tuple(i for r in rows for i in r.ids) if self.part == 0 else ()  # the group's examples, once
        return Loss(value, int(real.sum()), int(keep.sum()), sequence_pairs(rows) // self.n, ids)


def build(setup) -> LanguageModelling:
    """sft and cpt on the torch engine (hwft_torch.methods.Setup -> the objective): the cross-
    entropy kernel the run applied (kernels slot cross_entropy: hwft's chunked one, or Liger's
    fused linear cross-entropy on CUDA and ROCm), on the label positions; else the model's logits."""
    job = setup.job
    kernel = setup.kernels.get("cross_entropy") if setup.kernels is not None else None
    head, cross_entropy = None, linear_cross_entropy
    if kernel is not None and kernel.head is not None:
        head, cross_entropy = kernel.head, kernel.loss()
        job.log(f"kernels: {kernel.name} on the label positions (no full logits)")
    args = (
        setup.batches,
        job.recipe.train.gradient_accumulation_steps,
        setup.tokenizer.pad_token_id,
        attention_implementation(job.recipe),
        setup.device,
        head,
        setup.collective,
        cross_entropy,
    )
    n = job.recipe.parallel.sequence_parallel
    if n > 1:  # each row's tokens over n ranks (hwft_torch.sequence_parallel)
        objective = SequenceParallel(*args, n=n, micro_batch_size=job.recipe.train.micro_batch_size)
    else:
        objective = LanguageModelling(*args)
    balance_router(objective, setup.model, job)
    return objective
