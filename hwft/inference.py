"""Using what was trained: open a result on a backend, then generate from it or score text.

``hwft chat``, ``hwft serve``, ``hwft eval`` and ``hwft export`` all start here:

1. :func:`open_trained` turns what the user named into a :class:`Trained`: a run folder (its
   ``adapter/`` or ``model/``), a ``checkpoints/step-N`` folder, an adapter folder, a model
   folder, or a model name (``smollm2-135m``: the base, for a before/after comparison).
2. :func:`open_session` picks a backend (``auto``: the best available one whose record has an
   ``inference`` hook; plugin API 0.4) and asks it to load the weights: a :class:`Session`.
3. A session answers conversations token by token (:meth:`Session.chat`), with the model's
   chat template applied here, the same way for every engine; an engine only supplies the
   next-token loop (:meth:`Session.tokens`), teacher-forced scores (:meth:`Session.nll`) and
   raw logits (:meth:`Session.logits`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hwft.errors import ModelError, SelectionError, UserError
from hwft.models import check_adapter, check_remote_code, load_tokenizer, materialise, resolve_model


@dataclass(frozen=True)
class Trained:
    """A model to use: the folder whose weights load, maybe with a PEFT adapter on top."""

    label: str  #: as the user named it
    weights: Path  #: an HF safetensors model folder (the base, or a full fine-tune's model/)
    adapter: Path | None = None  #: a PEFT adapter folder applied on ``weights``
    run: Path | None = None  #: the run folder it came from, when it came from one
    recipe: Any = None  #: that run's resolved Recipe
    trust_remote_code: bool = False

    @property
    def tokenizer_dir(self) -> Path:
        """Where the tokenizer and chat template are: a run saves them beside its result."""
        if self.adapter is not None and (self.adapter / "tokenizer_config.json").is_file():
            return self.adapter
        return self.weights

    @property
    def template(self) -> str | None:
        """The run's chat template override (recipe ``template``), if it had one."""
        return getattr(self.recipe, "template", None)

    def describe(self) -> str:
        return f"{self.weights} + adapter {self.adapter}" if self.adapter else str(self.weights)

    @property
    def head(self) -> str:
        """``score`` for a reward model (a PEFT SEQ_CLS adapter, or a model whose config names a
        ...ForSequenceClassification architecture), else ``causal_lm``: hwft.methods.Method.head."""
        if self.adapter is not None:
            config = _json(self.adapter / "adapter_config.json")
            return "score" if config.get("task_type") == "SEQ_CLS" else "causal_lm"
        architectures = _json(self.weights / "config.json").get("architectures") or []
        return "score" if any(a.endswith("ForSequenceClassification") for a in architectures) else "causal_lm"


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _read_run_recipe(folder: Path):
    from hwft.recipe import load_recipe

    return load_recipe(folder / "recipe.yaml")


def _base_for_adapter(adapter: Path, recipe, run: Path | None) -> Path:
    """The base model an adapter was trained on: the run's ``model.name`` (an alias or a folder),
    else the adapter's ``base_model_name_or_path`` where that folder exists."""
    tried = []
    if recipe is not None:
        for base_dir in (run.parent if run else Path.cwd(), Path.cwd()):
            try:
                return materialise(resolve_model(recipe.model.name, base_dir), log=lambda m: None)
            except ModelError as exc:
                tried.append(str(exc))
    try:
        config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {adapter / 'adapter_config.json'}: {exc}") from None
    named = config.get("base_model_name_or_path")
    if named and (Path(named) / "config.json").is_file():
        return Path(named)
    if named:
        try:
            return materialise(resolve_model(named), log=lambda m: None)
        except ModelError as exc:
            tried.append(str(exc))
    raise ModelError(
        f"cannot find the base model of the adapter {adapter} (tried: {'; '.join(tried) or named!r}); "
        "name it with --base MODEL"
    )


def open_trained(target: str | Path, base: str | None = None, trust_remote_code: bool = False) -> Trained:
    """What ``target`` names, resolved to folders; raises ModelError saying what it expected. A
    recipe file names the run folder it writes (``output.dir``)."""
    path = Path(target).expanduser()
    recipe = run = None
    if path.is_file() and path.suffix in (".yaml", ".yml"):  # a recipe: the run it writes
        from hwft.recipe import load_recipe

        path = Path(load_recipe(path).output.dir).expanduser()
        if not (path / "recipe.yaml").is_file():
            raise ModelError(
                f"{target} writes its run to {path}, which holds no finished run yet; train it first "
                f"(hwft train {target})"
            )
    if path.is_dir() and (path / "recipe.yaml").is_file() and not (path / "config.json").is_file():
        run, recipe = path, _read_run_recipe(path)
        trust_remote_code = trust_remote_code or recipe.model.trust_remote_code
        if (path / "adapter").is_dir():
            path = path / "adapter"
        elif (path / "model").is_dir():
            path = path / "model"
        else:
            checkpoints = sorted((run / "checkpoints").glob("step-*")) if (run / "checkpoints").is_dir() else []
            hint = f"; it has checkpoints: use one, e.g. {checkpoints[-1]}" if checkpoints else ""
            raise ModelError(f"run folder {run} holds no adapter/ or model/ yet (the run has not finished){hint}")
    if path.is_dir() and (path / "adapter_config.json").is_file():
        check_adapter(path, "adapter folder")
        weights = materialise(resolve_model(base), log=lambda m: None) if base else _base_for_adapter(path, recipe, run)
        check_remote_code(weights, trust_remote_code)
        return Trained(str(target), weights, path.resolve(), run, recipe, trust_remote_code)
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelError(
            f"{path} is neither a run folder (recipe.yaml with adapter/ or model/), an adapter folder "
            "(adapter_config.json) nor a model folder (config.json)"
        )
    resolved = resolve_model(str(path) if run else str(target))  # a folder or a name; ModelError says what it tried
    weights = materialise(resolved, log=lambda m: None)
    check_remote_code(weights, trust_remote_code)
    return Trained(str(target), weights, None, run, recipe, trust_remote_code)


@dataclass
class Sampling:
    """How a reply is drawn: greedy at temperature 0, else softmax(logits / T) cut to top_p."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


class Session:
    """A loaded model on one backend. Engines subclass it and implement :meth:`tokens`,
    :meth:`nll` and :meth:`logits`; templating, stopping and decoding are shared here."""

    def __init__(self, trained: Trained, backend: str):
        from hwft.data.chat import ChatRenderer, resolve_template

        self.trained, self.backend = trained, backend
        self.tokenizer = load_tokenizer(trained.tokenizer_dir, trained.trust_remote_code)
        template = resolve_template(trained.template, trained.run or Path.cwd(), self.tokenizer)
        self.renderer = ChatRenderer(self.tokenizer, template)
        self.vision = None  #: the model's image processor (hwft.vision), loaded with the first image
        self.finish_reason = "stop"  #: of the last reply: stop (a stop token) or length
        self.generated_tokens = 0  #: of the last reply

    # -- what an engine implements ------------------------------------------------------------
    def tokens(self, prompt_ids: list[int], sampling: Sampling, extras: dict | None = None) -> Iterator[int]:
        """Token ids generated after ``prompt_ids``, one at a time, until max_new_tokens (the
        caller stops earlier at a stop token). ``extras``: what the forward takes beside the
        prompt's ids (an image prompt's pixels: hwft.vision.prompt); an engine that cannot
        take them refuses."""
        raise NotImplementedError

    def nll(self, rows: list, batch_size: int = 4) -> tuple[float, int]:
        """(sum of -log p over the label tokens of ``rows``, their count): hwft.data rows."""
        raise NotImplementedError

    def logits(self, ids: list[int]):
        """fp32 logits (numpy, sequence x vocabulary) of one sequence."""
        raise NotImplementedError

    def rewards(self, sequences: list[list[int]], batch_size: int = 4) -> list[float]:
        """A reward model's scalar reward of each token sequence (read at its last token)."""
        raise ModelError(
            f"the {self.backend} backend does not score with reward models (hwft.methods.rm); "
            "use a torch backend (--backend cpu)"
        )

    def conversation_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """A whole conversation's token ids, rendered as training renders it (what a reward
        model trained on such conversations scores)."""
        text = self.renderer.render(messages, tools)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # -- shared ---------------------------------------------------------------------------------
    def prompt_ids(self, messages: list[dict] | str) -> list[int]:
        """The conversation rendered with the chat template, ending where the assistant speaks;
        a model without a template continues the plain text of the last message."""
        if self.renderer.template is None:
            text = messages if isinstance(messages, str) else messages[-1]["content"]
            return self.tokenizer(text)["input_ids"]
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return self.renderer.prompt_ids(messages)

    def rng(self, sampling: Sampling):
        """A numpy generator for :func:`pick_token`, seeded per reply (replies reproduce)."""
        import numpy as np

        return np.random.default_rng(sampling.seed)

    #: whether the engine's forward takes images (hwft.vision): the torch session's does
    feeds_images = False

    def feed_images(self):
        """The model's image processor and family record, also given to the renderer (so rows
        with images render with their image tokens); refused in one line where the model reads
        no images or the engine feeds none."""
        from hwft import vision

        if self.vision is None:
            self.vision = vision.VisionInputs.for_model(self.trained.weights)
        if self.vision is None:
            raise UserError(
                f"{self.trained.describe()} is not a vision-language model of hwft's table "
                f"({', '.join(vision.FAMILIES)}): it reads no images; leave the images out"
            )
        if not self.feeds_images:
            raise UserError(f"the {self.backend} backend does not feed images to a model yet; use --backend cpu")
        self.renderer.vision = self.vision
        return self.vision

    def image_prompt(self, messages: list[dict], media: list) -> tuple[list[int], dict]:
        """The prompt ids of a conversation with images or videos, and their pixels (hwft.vision)."""
        from hwft import vision

        fed = self.feed_images()
        unfed = sorted({m.kind for m in media} - set(fed.family.kinds))
        if unfed:
            raise UserError(
                f"{fed.family.description} takes {' and '.join(k + 's' for k in fed.family.kinds)} only, not "
                f"{' or '.join(k + 's' for k in unfed)}; leave those out"
            )
        return vision.prompt(fed, self.renderer, messages, media, "the prompt")

    def stream(
        self, messages: list[dict] | str, sampling: Sampling | None = None, media: list | None = None
    ) -> Iterator[str]:
        """The reply as text pieces, as soon as they decode (a piece never ends mid-character);
        ``media``: the images of the messages' <image> placeholders (hwft.data.media.Media)."""
        from hwft.models import stop_token_ids

        if self.trained.head == "score":
            raise UserError(
                f"{self.trained.describe()} is a reward model: it scores answers and does not write "
                "them (hwft eval reports its pairwise accuracy)"
            )
        sampling = sampling or Sampling()
        stop = set(stop_token_ids(self.tokenizer))
        ids: list[int] = []
        shown = ""
        self.finish_reason, self.generated_tokens = "length", 0
        if media:
            assert not isinstance(messages, str), "images come with turns"
            prompt, extras = self.image_prompt(messages, media)
        else:
            prompt, extras = self.prompt_ids(messages), None
        for token in self.tokens(prompt, sampling, extras):
            if token in stop:
                self.finish_reason = "stop"
                break
            ids.append(token)
            self.generated_tokens = len(ids)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                continue
            if len(text) > len(shown):
                yield text[len(shown) :]
                shown = text

    def reply(self, messages: list[dict] | str, sampling: Sampling | None = None, media: list | None = None) -> str:
        return "".join(self.stream(messages, sampling, media)).strip()


def pick_token(logits, sampling: Sampling, rng) -> int:
    """The next token from one position's logits (numpy): argmax at temperature 0; otherwise a
    draw from softmax(logits / T) restricted to the smallest set of tokens whose probability
    adds up to top_p (nucleus sampling)."""
    import numpy as np

    logits = np.asarray(logits, dtype=np.float64)
    if sampling.temperature <= 0:
        return int(logits.argmax())
    z = logits / sampling.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if sampling.top_p < 1.0:
        order = np.argsort(-p)
        keep = np.cumsum(p[order]) - p[order] < sampling.top_p  # always keeps the first
        mask = np.zeros_like(p, dtype=bool)
        mask[order[keep]] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    return int(rng.choice(len(p), p=p))


def inference_backends(host) -> list[str]:
    """Available backends with an inference hook, best first (the training ranking)."""
    from hwft.select import rank

    return [n for n in rank(host) if host.backend(n).inference is not None]


def open_session(trained: Trained, backend: str = "auto", precision: str = "auto") -> Session:
    """Load ``trained`` on ``backend`` (auto: the best available that can); SelectionError
    says why a named backend cannot."""
    from hwft.plugins import get_host

    host = get_host()
    if backend == "auto":
        able = inference_backends(host)
        if not able:
            raise SelectionError("no available backend can load a model for inference (see `hwft env`)")
        backend = able[0]
    chosen = host.backend(backend)
    avail = host.probe(chosen.name)
    if not avail.available:
        raise SelectionError(
            f"backend '{chosen.name}' is not available here: {avail.reason} "
            f"(available: {', '.join(inference_backends(host)) or 'none'})"
        )
    if chosen.inference is None:
        raise SelectionError(
            f"backend '{chosen.name}' has no inference hook (plugin API 0.4); "
            f"use one of {', '.join(inference_backends(host)) or 'none'}"
        )
    return chosen.inference(trained, precision)
