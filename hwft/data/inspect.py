"""``hwft data inspect``: what the model will see, before a long run.

The first rows rendered with the chat template, the trained (label) tokens highlighted, token
counts, a histogram of lengths, and how well rows fill with and without packing.
"""

from __future__ import annotations

import random
import re
import statistics

from hwft.data.batching import Row, batch_order, efficiency, make_rows
from hwft.data.chat import IGNORE_INDEX, ChatRenderer, Tokenized, TokenizeStats
from hwft.data.kinds import Example
from hwft.data.kinds.sequences import encode, registered
from hwft.data.loading import load_train_data
from hwft.methods.lookup import method
from hwft.models import load_tokenizer, materialise_tokenizer, resolve_model
from hwft.plugins import get_host
from hwft.recipe import Recipe
from hwft.vision import VisionInputs

GREEN, RESET = "\033[32m", "\033[0m"


def highlight(tokenizer, tok: Tokenized, color: bool) -> str:
    """The decoded row with trained tokens in green (terminal) or inside [[ ]] (elsewhere)."""
    open_, close = (GREEN, RESET) if color else ("[[", "]]")
    out, run, trained = [], [], False
    for token, label in zip(tok.input_ids, tok.labels, strict=True):
        is_label = label != IGNORE_INDEX
        if is_label != trained and run:
            text = tokenizer.decode(run)
            out.append(f"{open_}{text}{close}" if trained else text)
            run = []
        trained = is_label
        run.append(token)
    if run:
        text = tokenizer.decode(run)
        out.append(f"{open_}{text}{close}" if trained else text)
    return "".join(out)


def histogram(lengths: list[int], bins: int = 10, width: int = 40) -> list[str]:
    lo, hi = min(lengths), max(lengths)
    step = max(1, -(-(hi - lo + 1) // bins))
    counts = [0] * bins
    for n in lengths:
        counts[min((n - lo) // step, bins - 1)] += 1
    top = max(counts)
    lines = []
    for i, c in enumerate(counts):
        if lo + i * step > hi:
            break
        bar = "#" * max(1 if c else 0, round(width * c / top))
        lines.append(f"  {lo + i * step:>6}-{lo + (i + 1) * step - 1:<6} {bar} {c}")
    return lines


def _shown(renderer: ChatRenderer, example: Example, max_length: int) -> list[tuple[str, Tokenized]]:
    """What of one example to show, as its kind's record says (a pair's two answers)."""
    return registered().of(example).shown(example, renderer, max_length)


def inspect(recipe: Recipe, rows: int = 3, color: bool = False, thumbnails: int = 0) -> tuple[str, dict]:
    """The report as text and as a dict (``--json``); ``thumbnails`` > 0: each shown row's images
    and videos as small pictures of that many pixels (data: URLs, hwft board's data tab)."""
    host = get_host()
    data = load_train_data(recipe, host.data_formats())
    model = resolve_model(recipe.model.name, recipe.resolve_path("."), recipe.model.revision)
    # the tokenizer is all it needs: the embedded model's converts alone, in seconds
    tokenizer = load_tokenizer(materialise_tokenizer(model), recipe.model.trust_remote_code)
    renderer = ChatRenderer.for_recipe(recipe, tokenizer)
    if model.ready:  # a vision-language model's image processor: how many tokens each image becomes
        renderer.vision = VisionInputs.for_data(model.path, recipe.data)
    template = renderer.template
    t = recipe.train
    lines = [
        f"model {model.name} ({model.path}); template: "
        + (recipe.template or ("the tokenizer's own" if template else "none (plain text only)"))
    ]
    for source in data.sources:
        where = source.path or (
            f"{source.random.rows} random rows of {source.random.length} tokens" if source.random else ""
        )
        lines.append(f"{source.label}: {where} (format {source.format})")
    lines.append(f"{data.describe()}" + (" (the first rows of each stream)" if data.streaming else ""))

    shown = []
    for example in data.examples[:rows]:
        for label, tok in _shown(renderer, example, t.max_length):
            part = f" {label}" if label else ""
            head = f"--- {example.source}{part}: {len(tok.input_ids)} tokens, {tok.num_labels} trained"
            media = tok.media_tokens or {}
            images, videos = media.get("image", []), media.get("video", [])
            for kind, counts in media.items():
                head += f"; {len(counts)} {kind}{'s' * (len(counts) != 1)} of {', '.join(map(str, counts))} tokens"
            lines += [head, collapsed(renderer, highlight(tokenizer, tok, color))]
            shown.append(
                {
                    "source": example.source,
                    "part": label,
                    "tokens": len(tok.input_ids),
                    "marked": highlight(tokenizer, tok, False),
                    # the same with each image's and video's run of tokens written once, with its count
                    "marked_short": collapsed(renderer, highlight(tokenizer, tok, False)),
                    "trained": tok.num_labels,
                    "text": tokenizer.decode(tok.input_ids),
                    "trained_text": tokenizer.decode([x for x in tok.labels if x != IGNORE_INDEX]),
                    "image_tokens": images,
                    "video_tokens": videos,
                    **({"thumbnails": pictures(example, thumbnails)} if thumbnails else {}),
                }
            )

    report: dict = {"schema": "hwft.data-inspect/1", "rows": shown, "examples": len(data.examples)}
    if method(recipe.method.objective).packs:
        stats = TokenizeStats()
        tokenized = [s for e in data.examples for s in encode(e, renderer, t.max_length, stats)]
        lengths = stats.lengths
        lines.append(f"--- {stats.summary(t.max_length)}")
        if lengths:
            lines.append(
                f"lengths in tokens: min {min(lengths)}, median {statistics.median(lengths):g}, max {max(lengths)}"
            )
            lines += histogram(lengths)
            packed = make_rows(tokenized, t.max_length, True)
            plain = make_rows(tokenized, t.max_length, False)
            fill = sum(lengths) / (len(packed) * t.max_length)
            eff_packed = _efficiency(packed, t.micro_batch_size, False, t.seed)
            eff_plain = _efficiency(plain, t.micro_batch_size, recipe.data.group_by_length, t.seed)
            lines.append(
                f"packing: {len(tokenized)} sequences -> {len(packed)} rows of up to {t.max_length} tokens "
                f"({fill:.1%} full); real tokens per computed token in micro-batches of "
                f"{t.micro_batch_size}: {eff_packed:.1%} packed, {eff_plain:.1%} unpacked"
                f"{' (grouped by length)' if recipe.data.group_by_length else ''}"
            )
            report.update(
                lengths=lengths,
                packed_rows=len(packed),
                packed_fill=fill,
                efficiency_packed=eff_packed,
                efficiency_unpacked=eff_plain,
                tokens=stats.tokens,
                trained_tokens=stats.label_tokens,
            )
    return "\n".join(lines), report


def pictures(example: Example, size: int) -> list[dict]:
    """{kind, src} of each image and video of the example: a data: URL of a small picture."""
    from hwft.data.media import thumbnail

    return [
        {"kind": m.kind, "src": thumbnail(m, example.source, size)}
        for m in getattr(example, "media", None) or []
        if m.kind != "audio"
    ]


def collapsed(renderer: ChatRenderer, text: str) -> str:
    """The row's text with each run of an image's or a video's tokens written once, with its count."""
    vision = renderer.vision
    if vision is None:
        return text
    for token in (vision.family.image_token, *([vision.family.video.token] if vision.family.video else [])):
        text = re.sub(f"(?:{re.escape(token)})+", lambda m, t=token: f"{t}x{len(m.group(0)) // len(t)}", text)
    return text


def _efficiency(rows: list[Row], micro_batch_size: int, group: bool, seed: int) -> float:
    return efficiency(batch_order(rows, micro_batch_size, random.Random(f"{seed}:0"), group))
