"""``hwft eval``: how good is the fine-tune, next to the model it started from.

On an evaluation set (``--data`` files, else the run's ``data.eval`` and ``data.val_size``
hold-out), for the fine-tuned model and its base, in one table:

- **loss**: mean next-token cross-entropy per answer token, ``L = -(1/N) sum_t log p(y_t | y_<t)``
  over the tokens training would have trained on (the same masking, template and max_length);
  **perplexity** ``exp(L)``;
- on rows with a reference answer (the last assistant turn of a conversation, or a prompt row's
  ``reference``), the greedy answer to the prompt is scored against it:
  **exact match** (equal after trimming and collapsing whitespace), **ROUGE-L** F1 (longest common
  subsequence of tokens, ``rouge-score`` with stemming) and corpus **BLEU** (``sacrebleu``).

Both packages compute locally; nothing is fetched (``evaluate.load`` would reach a hub).

A reward model (``objective: rm``) is scored on preference pairs instead: **pairwise accuracy**,
the share of pairs whose chosen answer gets the higher reward, and the mean **reward margin**
:math:`r(x, y_c) - r(x, y_r)`. It has no base to compare with (the base has no score head).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

from hwft.errors import DataError, UserError
from hwft.inference import Sampling, Session, Trained, open_session, open_trained

SCHEMA = "hwft.eval/1"


def evaluation_examples(trained: Trained, data: list[str] | None) -> tuple[list, str]:
    """(examples, where they came from): --data files, else the run's held-out examples."""
    from hwft.data.loading import load_examples, load_train_data
    from hwft.methods import DEFAULT
    from hwft.plugins import get_host

    formats = get_host().data_formats()
    objective = trained.recipe.method.objective if trained.recipe is not None else DEFAULT
    if data:
        examples = [e for path in data for e in load_examples(Path(path), objective=objective, formats=formats)]
        where = ", ".join(data)
    elif trained.recipe is not None and (trained.recipe.data.eval or trained.recipe.data.val_size):
        examples = load_train_data(trained.recipe, formats).eval_examples
        where = f"{(trained.run or trained.weights) / 'recipe.yaml'} (data.eval, data.val_size)"
    else:
        raise UserError(
            "eval: give --data FILE (rows with answers), or evaluate a run whose recipe has data.eval or data.val_size"
        )
    if not examples:
        raise DataError(f"eval: {where} holds no examples")
    return examples, where


def prompt_and_reference(example) -> tuple[list[dict], str] | None:
    """The turns before the last assistant answer and that answer, or a prompt row's reference
    (each kind's example says: ``Example.prompt_and_reference``)."""
    return example.prompt_and_reference()


def normalise(text: str) -> str:
    return " ".join(text.split())


def generation_scores(predictions: list[str], references: list[str]) -> dict:
    from rouge_score import rouge_scorer
    from sacrebleu import corpus_bleu

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]
    exact = [normalise(p) == normalise(r) for p, r in zip(predictions, references, strict=True)]
    return {
        "exact_match": sum(exact) / len(exact),
        "rouge_l": sum(rouge) / len(rouge),
        "bleu": corpus_bleu(predictions, [references]).score,
    }


def score(session: Session, examples: list, max_length: int, max_new_tokens: int, limit: int, batch_size: int) -> dict:
    """Loss and perplexity on the examples that have answer tokens; generation metrics on the
    first ``limit`` that have references."""
    from hwft.data.kinds.sequences import held_out_rows, registered

    out: dict = {}
    registry = registered()
    if any(getattr(e, "media", None) for e in examples):
        session.feed_images()  # rows with images render with their image tokens, and the pixels go along
    scored = [e for e in examples if registry.of(e).sequences]  # the kinds whose examples have labels
    if scored:
        rows = held_out_rows(scored, session.renderer, max_length)
        total, count = session.nll(rows, batch_size)
        out.update(loss=total / count, perplexity=math.exp(min(total / count, 700)), loss_tokens=count)
    asked = [(e, p) for e in examples if (p := prompt_and_reference(e)) is not None][:limit]
    pairs = [p for _, p in asked]
    if pairs:
        sampling = Sampling(max_new_tokens=max_new_tokens)
        predictions = [session.reply(turns, sampling, getattr(e, "media", None) or None) for e, (turns, _) in asked]
        out.update(
            generation_scores(predictions, [r for _, r in pairs]),
            generated=len(pairs),
            samples=[
                {"prompt": t[-1]["content"], "reference": r, "answer": a}
                for (t, r), a in list(zip(pairs, predictions, strict=True))[:3]
            ],
        )
    return out


def pairwise(session: Session, examples: list, max_length: int, batch_size: int) -> dict:
    """A reward model's pairwise accuracy and mean margin on the preference examples."""
    from hwft.data.kinds.preference import PreferenceExample, preference_pairs

    pairs, _ = preference_pairs([e for e in examples if isinstance(e, PreferenceExample)], session.renderer, max_length)
    chosen = session.rewards([p.chosen.input_ids for p in pairs], batch_size)
    rejected = session.rewards([p.rejected.input_ids for p in pairs], batch_size)
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return {
        "pairwise_accuracy": sum(m > 0 for m in margins) / len(margins),
        "reward_margin": sum(margins) / len(margins),
        "pairs": len(margins),
    }


def base_of(trained: Trained) -> Trained | None:
    """The model the fine-tune started from: the base under an adapter, or the run's model."""
    if trained.adapter is not None:
        return replace(trained, label="base", adapter=None)
    if trained.recipe is not None:
        base = open_trained(trained.recipe.model.name, trust_remote_code=trained.trust_remote_code)
        return replace(trained, label="base", weights=base.weights)
    return None


ROWS = (
    ("pairwise_accuracy", "pairwise accuracy", "{:.3f}"),
    ("reward_margin", "mean reward margin", "{:.3f}"),
    ("loss", "eval loss", "{:.4f}"),
    ("perplexity", "perplexity", "{:.2f}"),
    ("exact_match", "exact match", "{:.3f}"),
    ("rouge_l", "ROUGE-L F1", "{:.3f}"),
    ("bleu", "BLEU", "{:.2f}"),
)


def table(results: dict) -> str:
    names = list(results)
    lines = [
        "| metric | " + " | ".join(names) + (" | change |" if len(names) == 2 else " |"),
        "|---" * (len(names) + 1 + (len(names) == 2)) + "|",
    ]
    for key, label, fmt in ROWS:
        values = [results[n].get(key) for n in names]
        if all(v is None for v in values):
            continue
        cells = [fmt.format(v) if v is not None else "-" for v in values]
        if len(names) == 2 and None not in values:
            cells.append(("{:+" + fmt[2:]).format(values[1] - values[0]))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args) -> int:
    trained = open_trained(args.target, base=args.base, trust_remote_code=args.trust_remote_code)
    examples, where = evaluation_examples(trained, args.data)
    max_length = args.max_length or (trained.recipe.train.max_length if trained.recipe is not None else 1024)
    models = [("fine-tuned", trained)]
    scores = trained.head == "score"  # a reward model: pairwise accuracy, and no base to compare
    base = None if args.no_base or scores else base_of(trained)
    if base is not None:
        models.insert(0, ("base", base))
    results = {}
    for name, model in models:
        session = open_session(model, args.backend, args.precision)
        print(
            f"hwft eval: {name} ({model.describe()}) on {session.backend}: {len(examples)} examples from {where}",
            file=sys.stderr,
            flush=True,
        )
        if scores:
            results[name] = pairwise(session, examples, max_length, args.batch_size)
        else:
            results[name] = score(session, examples, max_length, args.max_new_tokens, args.limit, args.batch_size)
        del session
    report = {
        "schema": SCHEMA,
        "target": str(args.target),
        "data": where,
        "examples": len(examples),
        "backend": args.backend,
        "max_new_tokens": args.max_new_tokens,
        "results": results,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(table(results))
    for name, result in results.items():
        for sample in result.get("samples", [])[:1]:
            print(
                f"\n[{name}] Q: {sample['prompt']}\n[{name}] A: {sample['answer']}\n[reference] {sample['reference']}"
            )
    return 0
