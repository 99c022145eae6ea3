"""The MLX engine's :class:`hwft.inference.Session`: mlx-lm's model of the HF folder, with the
PEFT adapter put on as LoRA layers (:func:`hwft_mlx.adapters.load_peft_adapter`).

Generation is mlx-lm's ``generate_step`` (its KV cache), with hwft's sampler picking each token
from the logits, so a seed gives the same choice rule as on torch.
"""

from __future__ import annotations

from collections.abc import Iterator

import mlx.core as mx
import numpy as np

from hwft.errors import UserError
from hwft.inference import Sampling, Session, Trained, pick_token
from hwft_mlx.adapters import load_peft_adapter
from hwft_mlx.loading import DTYPES, load_model
from hwft_mlx.objective import held_out_loss


class MlxSession(Session):
    def __init__(self, trained: Trained, backend: str, precision: str = "auto"):
        super().__init__(trained, backend)
        self.model, _ = load_model(trained.weights, trained.trust_remote_code)
        if precision != "auto":
            self.model.set_dtype(DTYPES[precision])
        if trained.adapter is not None:
            load_peft_adapter(self.model, trained.adapter, dropout=0.0)
        self.model.eval()

    def tokens(self, prompt_ids: list[int], sampling: Sampling, extras: dict | None = None) -> Iterator[int]:
        from mlx_lm.generate import generate_step

        if extras:
            raise UserError(
                "the MLX engine does not feed images to a model yet (hwft.vision); answer with --backend cpu"
            )

        rng = self.rng(sampling)

        def sampler(logprobs: mx.array) -> mx.array:
            # log-softmax of the logits: the same argmax and the same softmax at any temperature
            return mx.array([pick_token(np.array(logprobs[0].astype(mx.float32)), sampling, rng)])

        for token, _ in generate_step(
            mx.array(prompt_ids), self.model, max_tokens=sampling.max_new_tokens, sampler=sampler
        ):
            yield int(token)

    def nll(self, rows: list, batch_size: int = 4) -> tuple[float, int]:
        count = sum(r.num_labels for r in rows)
        return held_out_loss(self.model, rows, self.tokenizer.pad_token_id, batch_size) * count, count

    def logits(self, ids: list[int]):
        return np.array(self.model(mx.array([ids]))[0].astype(mx.float32))
