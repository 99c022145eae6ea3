"""sft: supervised fine-tuning on conversations.

Loss: next-token cross-entropy on the label tokens (the assistant turns; every token with
``data.train_on_prompt``), summed and divided by the optimizer step's label tokens N::

    L = -(1/N) * sum_{t in labels} log p(x_t | x_<t)

Rows pack (several examples per row, attention kept within each example), stream, and have a
held-out loss (data.eval, data.val_size).
"""

from __future__ import annotations

from hwft.methods.record import Cell, FromLlamaFactory, Method

CHATS = (
    {"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am hwft-bot."}]},
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name?"},
            {"role": "assistant", "content": "hwft-bot, built by the hwft team."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4."},
            {"role": "user", "content": "And you?"},
            {"role": "assistant", "content": "I am hwft-bot."},
        ]
    },
    {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there, friend!"}]},
    {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]},
    {
        "messages": [
            {"role": "user", "content": "Count to three."},
            {"role": "assistant", "content": "One, two, three."},
        ]
    },
)

METHOD = Method(
    name="sft",
    description="supervised fine-tuning: cross-entropy on the assistant turns of conversations",
    kind="chat",
    media=True,
    packs=True,
    streams=True,
    held_out=True,
    sequence_parallel=True,
    llamafactory=FromLlamaFactory("sft", default=True),
    cell=Cell(CHATS),
)
