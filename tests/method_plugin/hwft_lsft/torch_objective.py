"""lsft on hwft's torch engine: the loss of :mod:`hwft_lsft.method`, from the model's logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hwft.data.chat import IGNORE_INDEX
from hwft.objective import Loss, Objective, sequence_pairs, step_label_count
from hwft_torch.modeling import attention_implementation
from hwft_torch.objective import to_tensors


class LabelSmoothed(Objective):
    def __init__(self, batches, accumulation: int, pad_id: int, attention: str, device, epsilon: float, collective):
        super().__init__(batches, collective)
        self.accumulation, self.pad_id, self.attention, self.device = accumulation, pad_id, attention, device
        self.epsilon = epsilon

    def step(self, model, step: int):
        return self.step_shares(self.accumulation, step_label_count)  # normalised by the step's label tokens

    def loss(self, model, micro) -> Loss:
        rows, num_items = micro
        tensors = to_tensors(rows, self.pad_id, self.attention, self.device)
        labels = tensors.pop("labels")
        logits = model(**tensors, use_cache=False).logits[:, :-1].float()
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        # torch's own label smoothing is the loss; the two terms of its maths are logged apart
        value = F.cross_entropy(logits[keep], targets[keep], label_smoothing=self.epsilon, reduction="sum") / num_items
        trained = int(keep.sum())
        with torch.no_grad():
            logps = F.log_softmax(logits[keep], dim=-1)
            nll = -logps.gather(1, targets[keep][:, None]).sum()
            self.note(nll=float(nll) / max(trained, 1), smoothing=float(-logps.mean(dim=-1).sum()) / max(trained, 1))
        return Loss(
            value,
            sum(len(r.input_ids) for r in rows),
            trained,
            sequence_pairs(rows),
            tuple(i for r in rows for i in r.ids),
        )


def build(setup) -> LabelSmoothed:
    """hwft_torch.methods.Setup -> the objective."""
    recipe = setup.job.recipe
    return LabelSmoothed(
        setup.batches,
        recipe.train.gradient_accumulation_steps,
        setup.tokenizer.pad_token_id,
        attention_implementation(recipe),
        setup.device,
        recipe.method.lsft.epsilon,
        setup.collective,
    )
