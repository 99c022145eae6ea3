"""The transformers model under a PEFT wrapper."""

from __future__ import annotations

from typing import Any


def base_model(model: Any) -> Any:
    """``model``'s transformers model: under a PEFT wrapper its base (``get_base_model()``), else
    the model itself. Typed ``Any``: what comes back is whichever ``PreTrainedModel`` subclass
    the family loads."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
