"""The built-in data kinds, registered through ``hwft_register_data_kinds`` as a plugin's would
be (the plugin host loads this module by name, as it loads an entry point)."""

from __future__ import annotations

import pluggy

from hwft.data.kinds import DataKind
from hwft.data.kinds.chat import ChatExample
from hwft.data.kinds.feedback import FeedbackExample
from hwft.data.kinds.preference import PreferenceExample
from hwft.data.kinds.prompt import PromptExample
from hwft.data.kinds.text import TextExample
from hwft.data.kinds.tokens import TokensExample

hookimpl = pluggy.HookimplMarker("hwft")

SEQUENCES = "hwft.data.kinds.sequences:sequence_batches"

BUILTIN = (
    DataKind(
        "chat",
        "a conversation ending with the assistant; the loss on its assistant turns",
        ChatExample,
        SEQUENCES,
        encode="hwft.data.kinds.chat:encode",
    ),
    DataKind(
        "text",
        "plain text, every token a label, split into max_length chunks",
        TextExample,
        SEQUENCES,
        encode="hwft.data.kinds.text:encode",
    ),
    DataKind(
        "tokens",
        "token ids, tokenised already, every token a label",
        TokensExample,
        SEQUENCES,
        encode="hwft.data.kinds.tokens:encode",
    ),
    DataKind(
        "preference",
        "prompt turns with a chosen and a rejected answer",
        PreferenceExample,
        "hwft.data.kinds.preference:preference_batches",
        inspect="hwft.data.kinds.preference:inspect",
    ),
    DataKind(
        "feedback",
        "prompt turns with one answer, desirable or not",
        FeedbackExample,
        "hwft.data.kinds.feedback:feedback_batches",
        inspect="hwft.data.kinds.feedback:inspect",
    ),
    DataKind(
        "prompt",
        "prompt turns with an optional reference answer, sampled from while training",
        PromptExample,
        "hwft.data.kinds.prompt:prompt_batches",
        inspect="hwft.data.kinds.prompt:inspect",
    ),
)


@hookimpl
def hwft_register_data_kinds(register):
    for kind in BUILTIN:
        register(kind)
