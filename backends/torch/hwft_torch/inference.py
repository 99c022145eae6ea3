"""The torch engine's :class:`hwft.inference.Session`: transformers' model (with the PEFT
adapter on top, not merged, so scores are exactly those of training) on one device.

Generation is an explicit loop over the KV cache: the prompt's forward fills the cache, then
each step feeds the one token picked from the last position's logits. Being a generator, it
stops the moment the caller stops reading (a stop token, a closed connection).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch

from hwft import vision
from hwft.errors import ModelError
from hwft.inference import Sampling, Session, Trained, pick_token
from hwft_torch.modeling import (
    DTYPES,
    HEADS,
    IMAGE_TEXT_TO_TEXT,
    experts_implementation,
    family_attention,
    model_type_of,
)
from hwft_torch.objective import held_out_loss


def inference_dtype(precision: str, runtime) -> torch.dtype:
    """auto: bf16 on an accelerator that computes it, fp32 on the CPU."""
    if precision == "auto":
        return torch.bfloat16 if runtime.type != "cpu" and runtime.bf16() else torch.float32
    return DTYPES[precision]


def load_for_inference(trained: Trained, runtime, dtype: torch.dtype):
    """The model of ``trained`` in eval mode on the runtime's device: a causal LM, or a reward
    model's sequence-classification model (its ``head``)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    head = HEADS[trained.head]
    if head is HEADS["causal_lm"] and vision.family_of(trained.weights) is not None:
        head = IMAGE_TEXT_TO_TEXT  # the vision tower reads the prompt's images
    needed = family_attention(model_type_of(trained.weights))
    try:
        model = head.auto_class().from_pretrained(
            trained.weights,
            dtype=dtype,
            trust_remote_code=trained.trust_remote_code,
            local_files_only=True,
            use_safetensors=True,
            attn_implementation=needed[0] if needed else "sdpa",
            **head.extra,
            **experts_implementation(model_type_of(trained.weights)),
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a {head.what} from {trained.weights}: {exc}") from None
    if trained.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, trained.adapter, is_trainable=False)
    return model.to(runtime.device(0)).eval()


class TorchSession(Session):
    feeds_images = True  # hwft.vision: its forward takes a prompt's or a row's pixels

    def __init__(self, trained: Trained, backend: str, runtime, precision: str = "auto"):
        super().__init__(trained, backend)
        self.dtype = inference_dtype(precision, runtime)
        self.model = load_for_inference(trained, runtime, self.dtype)
        self.device = next(self.model.parameters()).device

    @torch.no_grad()
    def tokens(self, prompt_ids: list[int], sampling: Sampling, extras: dict | None = None) -> Iterator[int]:
        rng = self.rng(sampling)
        ids = torch.tensor([prompt_ids], device=self.device)
        cache = None
        # An image prompt's pixels, grid and token types go with the prompt's forward only: the
        # cache holds what they made.
        first = {
            k: torch.as_tensor(v, device=self.device).to(self.dtype if k == "pixel_values" else torch.long)
            for k, v in (extras or {}).items()
        }
        for _ in range(sampling.max_new_tokens):
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, **first)
            first = {}
            cache = out.past_key_values
            token = pick_token(out.logits[0, -1].float().cpu().numpy(), sampling, rng)
            yield token
            ids = torch.tensor([[token]], device=self.device)

    @torch.no_grad()
    def nll(self, rows: list, batch_size: int = 4) -> tuple[float, int]:
        count = sum(r.num_labels for r in rows)
        mean = held_out_loss(self.model, rows, self.tokenizer.pad_token_id, "sdpa", self.device, batch_size)
        return mean * count, count

    @torch.no_grad()
    def rewards(self, sequences: list[list[int]], batch_size: int = 4) -> list[float]:
        if self.trained.head != "score":
            return super().rewards(sequences, batch_size)
        from hwft.data.batching import Row, pad
        from hwft_torch.rm import sequence_rewards

        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        out: list[float] = []
        for start in range(0, len(sequences), batch_size):
            rows = [Row(ids, ids, [len(ids)]) for ids in sequences[start : start + batch_size]]
            batch = {
                k: torch.tensor(v, device=self.device)
                for k, v in pad(rows, self.tokenizer.pad_token_id).items()
                if k in ("input_ids", "attention_mask")
            }
            out += sequence_rewards(self.model, batch).tolist()
        return out

    @torch.no_grad()
    def logits(self, ids: list[int]):
        out = self.model(input_ids=torch.tensor([ids], device=self.device)).logits
        return out[0].float().cpu().numpy()
