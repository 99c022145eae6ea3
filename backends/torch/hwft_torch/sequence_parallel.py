"""Sequence parallelism (``parallel.sequence_parallel: N``) for sft and cpt on the torch engine:
DeepSpeed's Ulysses attention for Hugging Face models (ALST, ``UlyssesSPAttentionHF``) over SDPA.

Each group of N consecutive ranks trains one micro-batch together, every rank a contiguous 1/N
of its tokens: embeddings, MLPs, norms and the loss run on the rank's own tokens, and in each
attention layer an all-to-all swaps the sequence split for a head split (each rank attends with
all tokens of 1/N of the heads), and back. For the numbers to be the unsplit ones:

- the labels are shifted *before* the split (a rank's last token predicts the next rank's first);
- the position ids are the row's own (global), split alike, and causal attention is rebuilt
  from them after the all-to-all;
- each rank's loss is its tokens' summed cross-entropy over the label count of the whole step,
  so the ranks' losses add up to the step's loss, as every strategy's do: DDP and FSDP2 average
  gradients over all ranks and hwft backpropagates ``world_size * loss`` (hwft_torch.parallel),
  which makes the step's gradient the sum over every rank's tokens.

Rows are right-padded to a multiple of N (the padding's labels are ignored; causal attention
keeps real tokens from seeing it), and micro-batches short of ``micro_batch_size`` rows get rows
of padding, since Ulysses fixes the batch shape. Packed rows are refused (their examples would
need their own masks after the all-to-all). Evaluation and generation (eval mode) skip Ulysses:
each rank computes them whole.
"""

from __future__ import annotations

import torch

from hwft.data.batching import Row, pad
from hwft.data.chat import IGNORE_INDEX
from hwft.distributed import World
from hwft.errors import RecipeError
from hwft.objective import Loss, sequence_pairs
from hwft_torch.objective import LanguageModelling


def check_model(config, n: int) -> None:
    """Ulysses splits the attention heads over the N ranks."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    if heads % n:
        raise RecipeError(f"parallel.sequence_parallel {n}: the model has {heads} attention heads, which do not "
                          f"split over {n} ranks; use a divisor of {heads}")
    if kv % n and n % kv:
        raise RecipeError(f"parallel.sequence_parallel {n}: the model's {kv} key/value heads neither split over "
                          f"{n} ranks nor replicate onto them; use a divisor or a multiple of {kv}")


def register(model, n: int, micro_batch_size: int):
    """Route the model's SDPA through Ulysses (DeepSpeed replaces transformers' "sdpa" entry);
    returns a function that puts the plain SDPA back."""
    import deepspeed.comm
    import deepspeed.ops
    from deepspeed.runtime.sequence_parallel import parallel_state_sp
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if next(model.parameters()).device.type == "cpu":
        # As for ZeRO (hwft_torch.parallel): no JIT build of DeepSpeed's shared-memory inference all-reduce.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.comm.init_distributed(dist_backend=torch.distributed.get_backend(), verbose=False)
    plain = ALL_ATTENTION_FUNCTIONS["sdpa"]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    UlyssesSPAttentionHF.register_with_transformers(base, "sdpa", n, micro_batch_size, seq_length_is_variable=True,
                                                    disable_in_eval=True)

    def undo() -> None:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = plain
        parallel_state_sp._release_sequence_parallel_groups()

    return undo


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
        return {"input_ids": ids[:, share].to(self.device), "position_ids": positions[:, share].to(self.device),
                "targets": targets[:, share].to(self.device), "real": real[:, share]}

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
            dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else None
            value = self.cross_entropy(hidden[keep], weight, targets[keep], num_items, dtype)
        ids = tuple(i for r in rows for i in r.ids) if self.part == 0 else ()  # the group's examples, once
        return Loss(value, int(real.sum()), int(keep.sum()), sequence_pairs(rows) // self.n, ids)
