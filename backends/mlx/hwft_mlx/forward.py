# mlx's nn.Module.__getattr__ has no return annotation, so pyright reads each child module
# (``model.args``, ``glu.gate_proj``) as possibly None:
# pyright: reportOptionalMemberAccess=false, reportOptionalCall=false
"""The forward pass hwft trains with on MLX: the decoder's hidden states (packed rows through
hwft's block-diagonal mask where the family packs: hwft_mlx.packing) and the output layer on
just the positions a loss needs, with the family's own logit transform (its record's options)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from hwft_mlx.media import is_vision
from hwft_mlx.packing import decoder_hidden, language_model, prove


def architecture(model: nn.Module) -> str:
    """The mlx-lm architecture of ``model`` (its module under mlx_lm.models): the MLX family table's key."""
    return type(model).__module__.rsplit(".", 1)[-1]


def family(model: nn.Module):
    """The model's record in the MLX family table (hwft_mlx.families), or the generic one."""
    from hwft.plugins import get_host

    return get_host().families().lookup("mlx", architecture(model))


#: The attribute a model keeps its load-time packing proof in (None: packs; else why not). On
#: the model, not in a table by id(): a freed model's id is reused by the next one.
_PROOF = "_hwft_packing_problem"


def packing_problem(model: nn.Module) -> str | None:
    """None where :func:`hidden_states` keeps packed examples apart for this model: its family
    has the ``mlx_packing`` path (proven by the tests), or the load-time proof
    (:func:`hwft_mlx.packing.prove`) passed for it. Else why not."""
    if is_vision(model):
        return "mlx-vlm's forward of a vision-language model takes no packed mask"
    if family(model).has("mlx_packing"):
        return None
    if not hasattr(model, _PROOF):
        embedding = next(m for _, m in model.named_modules() if isinstance(m, nn.Embedding))
        object.__setattr__(model, _PROOF, prove(model, output_logits, embedding.weight.shape[0], mask_dims(model)))
    return getattr(model, _PROOF)


def packs(model: nn.Module) -> bool:
    """Whether :func:`hidden_states` runs this model (and keeps packed examples apart)."""
    return packing_problem(model) is None


def hidden_states(model: nn.Module, input_ids: mx.array, segments=None) -> mx.array:
    """The decoder's last hidden states; ``segments`` (batch, L), where rows pack several
    examples, keeps each example to itself (:mod:`hwft_mlx.packing`). Without it, this is
    mlx-lm's own forward up to the output layer."""
    return decoder_hidden(model, input_ids, segments, mask_dims(model))


def mask_dims(model: nn.Module) -> int:
    """The rank of the family's attention scores a packed mask broadcasts against (hwft_mlx.packing.SegmentMask)."""
    return int(family(model).options.get("mask_dims", 4))


def output_logits(model: nn.Module, hidden: mx.array) -> mx.array:
    """The output layer applied to hidden states, as the family's own call applies it: tied
    embeddings or ``lm_head``, then the family's transform of the logits where it has one
    (``options["logits"]`` in hwft_mlx.families: Gemma 2's soft-capping, Granite's scaling)."""
    if "lm_head" in model and not getattr(model.args, "tie_word_embeddings", False):
        logits = model.lm_head(hidden)
    else:
        logits = language_model(model).embed_tokens.as_linear(hidden)
    transform = family(model).options.get("logits")
    return transform(model, logits) if transform is not None else logits
