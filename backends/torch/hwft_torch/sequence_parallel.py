"""Sequence parallelism (``parallel.sequence_parallel: N``) on the torch engine: DeepSpeed's
Ulysses attention for Hugging Face models (ALST, ``UlyssesSPAttentionHF``) over SDPA; the
objective that splits each row is :class:`hwft_torch.language_modelling.SequenceParallel`.

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

from hwft.errors import RecipeError
from hwft_torch.unwrap import base_model


def check_model(config, n: int) -> None:
    """Ulysses splits the attention heads over the N ranks."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    if heads % n:
        raise RecipeError(
            f"parallel.sequence_parallel {n}: the model has {heads} attention heads, which do not "
            f"split over {n} ranks; use a divisor of {heads}"
        )
    if kv % n and n % kv:
        raise RecipeError(
            f"parallel.sequence_parallel {n}: the model's {kv} key/value heads neither split over "
            f"{n} ranks nor replicate onto them; use a divisor or a multiple of {kv}"
        )


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
    base = base_model(model)
    UlyssesSPAttentionHF.register_with_transformers(
        base, "sdpa", n, micro_batch_size, seq_length_is_variable=True, disable_in_eval=True
    )

    def undo() -> None:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = plain
        parallel_state_sp._release_sequence_parallel_groups()

    return undo
