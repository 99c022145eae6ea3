"""The chat kind: a conversation ending with the assistant (sft), rendered with the chat
template; the loss is taken on the assistant turns (data.mask_history: the last one;
data.train_on_prompt: every token; a turn with ``train: False`` is context only)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hwft.data.chat import ChatRenderer, Message, Tokenized, TokenizeStats
from hwft.data.kinds import Example
from hwft.errors import DataError


@dataclass
class Turns(Example):
    """What the conversational kinds share: turns and the tools they may call."""

    messages: list[Message]  #: the conversation (chat), or the turns before the answer(s)
    tools: list[dict] | None = None  #: tool definitions, OpenAI's function shape
    #: images, videos and audio clips (hwft.data.media), in the order of their placeholders
    #: (<image>, <video>, <audio>) in the turns' text
    media: list = field(default_factory=list, kw_only=True)

    def turns(self) -> list[Message]:
        """Every turn the example renders (the chat template must render them all)."""
        return self.messages


@dataclass
class ChatExample(Turns):
    """A conversation ending with an assistant turn."""

    kind = "chat"

    def prompt_and_reference(self) -> tuple[list[dict], str] | None:
        if self.messages and self.messages[-1]["role"] == "assistant":
            turns = [{"role": m["role"], "content": m["content"]} for m in self.messages[:-1]]
            return turns, self.messages[-1].get("content") or ""
        return None


def encode(example: ChatExample, renderer: ChatRenderer, max_length: int, stats: TokenizeStats) -> list[Tokenized]:
    """The conversation's one sequence, cut to ``max_length`` (counted); none where no label
    token is left."""
    tok = renderer.tokenize(example)
    if len(tok.input_ids) > max_length and tok.inputs is not None:
        media = "images" if set(tok.media_tokens or {}) <= {"image"} else "videos"
        lower = "data.image_max_pixels" if media == "images" else "data.video_max_pixels or data.video_fps"
        raise DataError(
            f"{example.source} is {len(tok.input_ids)} tokens with its {media}, over train.max_length "
            f"{max_length}, and their tokens cannot be cut; raise train.max_length, or lower {lower}"
        )
    if len(tok.input_ids) > max_length:
        stats.truncated += 1
        tok = Tokenized(tok.input_ids[:max_length], tok.labels[:max_length])
    chunks = [tok] if tok.num_labels else []
    stats.count(chunks)
    return chunks
