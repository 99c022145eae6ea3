"""hwft's DPO and GRPO losses held to TRL 1.16 (a test-only dependency) on identical inputs.

TRL has no standalone loss function, so each test builds TRL's trainer on the same tiny model
and calls its ``compute_loss`` with hand-built inputs carrying the token ids hwft uses; hwft's
objective computes its loss from the same ids. fp32 throughout; equal to 1e-5.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch

from hwft.data.chat import ChatRenderer
from hwft.data.kinds.feedback import FeedbackExample, feedback_items
from hwft.data.kinds.preference import PreferenceExample, tokenize_pair
from hwft.methods.dpo import DpoSpec
from hwft.methods.grpo import GrpoSpec

pytest.importorskip("trl")


def _models(model_dir):
    """A policy and a different reference: the tiny model, and a perturbed copy of it."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    policy = copy.deepcopy(reference)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    return policy, reference


def _pairs(tokenizer):
    renderer = ChatRenderer(tokenizer, tokenizer.chat_template)
    rows = [
        ("What is the capital of France?", "Paris.", "I think it might be Lyon, or maybe Marseille."),
        ("Say hello.", "Hello there, friend!", "No."),
        ("Name a colour.", "Blue.", "A colour is a property of light."),
    ]
    return [
        tokenize_pair(
            renderer,
            PreferenceExample(
                [{"role": "user", "content": q}],
                chosen=[{"role": "assistant", "content": c}],
                rejected=[{"role": "assistant", "content": r}],
            ),
        )
        for q, c, r in rows
    ]


@pytest.mark.parametrize("loss, smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.2)])
def test_dpo_loss_equals_trl(tiny_llama, tokenizer, tmp_path, loss, smoothing):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from hwft_torch.dpo import Preference, pair_tensors
    from hwft_torch.modeling import Reference

    policy, reference = _models(tiny_llama)
    pairs = _pairs(tokenizer)
    beta = 0.3
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=DPOConfig(
            output_dir=str(tmp_path),
            beta=beta,
            loss_type=[loss],
            label_smoothing=smoothing,
            report_to=[],
            per_device_train_batch_size=2,
            use_cpu=True,
            bf16=False,
        ),
        train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2),
        processing_class=tokenizer,
    )
    policy.train()
    batch = pair_tensors(pairs, tokenizer.pad_token_id, torch.device("cpu"))
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "completion_mask": (batch["labels"] != -100).long(),
    }
    expected = trainer.compute_loss(trainer.model, inputs).item()

    spec = DpoSpec(beta=beta, loss=loss, label_smoothing=smoothing)
    objective = Preference(
        None, spec, 1, tokenizer.pad_token_id, torch.device("cpu"), Reference(policy, copy_of=reference)
    )
    got = objective.loss(policy, (pairs, len(pairs))).value.item()
    assert got == pytest.approx(expected, abs=1e-5)
    assert expected != pytest.approx(0.6931, abs=1e-3), "policy and reference must differ"
    metrics = objective.log_metrics()
    assert set(metrics) == {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy"}


def test_cdpo_label_smoothing_follows_its_formula(tiny_llama, tokenizer):
    """TRL 1.16's sigmoid loss ignores label_smoothing; hwft's is conservative DPO, checked
    against the formula -(1-e) log s(b D) - e log s(-b D) on the same log-probabilities."""
    import torch.nn.functional as F

    from hwft_torch.dpo import Preference, answer_logps, pair_tensors
    from hwft_torch.modeling import Reference

    policy, reference = _models(tiny_llama)
    pairs = _pairs(tokenizer)
    batch = pair_tensors(pairs, tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        pc, pr = answer_logps(policy, batch)
        rc, rr = answer_logps(reference, batch)
    beta, eps = 0.3, 0.1
    delta = (pc - rc) - (pr - rr)
    expected = (-(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)).mean().item()
    objective = Preference(
        None,
        DpoSpec(beta=beta, label_smoothing=eps),
        1,
        tokenizer.pad_token_id,
        torch.device("cpu"),
        Reference(policy, copy_of=reference),
    )
    assert objective.loss(policy, (pairs, len(pairs))).value.item() == pytest.approx(expected, abs=1e-6)


def _rollouts(tokenizer, generator):
    """Four completions of two equal-length prompts (TRL's forward has no position ids, so
    left padding would shift its positions; hwft counts real tokens), ragged completion masks."""
    from hwft_torch.grpo import Rollouts

    renderer = ChatRenderer(tokenizer, tokenizer.chat_template)
    a, b = renderer.prompt_ids("What is 2 + 3?"), renderer.prompt_ids("What is 4 + 1?")
    assert len(a) == len(b)
    prompt_ids = torch.tensor([a, a, b, b])
    completion_ids = torch.randint(10, 4000, (4, 7), generator=generator)
    completion_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 6 + [0], [1] * 2 + [0] * 5])
    return Rollouts(
        prompt_ids,
        torch.ones_like(prompt_ids),
        completion_ids,
        completion_mask,
        completion_mask[:, -1] == 0,
        advantages=torch.tensor([0.9, -0.9, 1.2, -0.4]),
    )


@pytest.mark.parametrize("loss_type, num_iterations", [("dapo", 1), ("dapo", 2), ("grpo", 2), ("dr_grpo", 2)])
def test_grpo_loss_equals_trl(tiny_llama, tokenizer, tmp_path, loss_type, num_iterations):
    """dapo (TRL's default) and the other aggregations, with a KL term, at a sampling
    temperature; with two passes per rollout batch the old log-probabilities differ from the
    current ones and clipping acts."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from hwft_torch.grpo import GroupRelative, completion_logps

    policy, reference = _models(tiny_llama)
    temperature, beta = 0.7, 0.04
    generator = torch.Generator().manual_seed(5)
    r = _rollouts(tokenizer, generator)
    with torch.no_grad():
        r.ref_logps = completion_logps(reference, r, temperature)
        if num_iterations > 1:
            current = completion_logps(policy, r, temperature)
            r.old_logps = current + torch.randn(current.shape, generator=generator) * 0.5
    completions, max_new_tokens = len(r.completion_ids), r.completion_ids.shape[1]
    r.normaliser = {
        "dapo": float(r.completion_mask.sum()),
        "grpo": completions,
        "dr_grpo": completions * max_new_tokens,
    }[loss_type]

    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
        args=GRPOConfig(
            output_dir=str(tmp_path),
            beta=beta,
            epsilon=0.2,
            loss_type=loss_type,
            temperature=temperature,
            num_generations=2,
            per_device_train_batch_size=4,
            num_iterations=num_iterations,
            max_completion_length=7,
            report_to=[],
            use_cpu=True,
            bf16=False,
        ),
        train_dataset=Dataset.from_list([{"prompt": "x"}] * 4),
        processing_class=tokenizer,
    )
    trainer.current_gradient_accumulation_steps = 1
    policy.train()  # TRL's training-mode normaliser (no dropout in the tiny model)
    inputs = {
        "prompt_ids": r.prompt_ids,
        "prompt_mask": r.prompt_mask,
        "completion_ids": r.completion_ids,
        "completion_mask": r.completion_mask,
        "advantages": r.advantages,
        "ref_per_token_logps": r.ref_logps,
        "num_items_in_batch": r.completion_mask.sum(),
    }
    if r.old_logps is not None:
        inputs["old_per_token_logps"] = r.old_logps
    expected = trainer.compute_loss(trainer.model, inputs).item()

    spec = GrpoSpec(
        beta=beta,
        epsilon=0.2,
        temperature=temperature,
        num_iterations=num_iterations,
        loss_type=loss_type,
        rewards=["exact_match"],
    )
    objective = GroupRelative(None, spec, 1, tokenizer, {}, torch.device("cpu"), None, None, nullcontext)
    got = objective.loss(policy, r).value.item()
    assert got == pytest.approx(expected, abs=1e-5)
    clip = objective.log_metrics()["clip_ratio"]
    assert (clip > 0) if num_iterations > 1 else (clip == 0)
    assert trainer._metrics["train"]["clip_ratio/region_mean"][-1] == pytest.approx(clip, abs=1e-6)


# ------------------------------------------------------------------ the reference-free pair losses


def _mean_answer_logps(policy, tokenizer, pairs):
    """Each pair's chosen and rejected mean answer-token log-probabilities, and the batch."""
    from hwft_torch.dpo import answer_logps, pair_tensors

    batch = pair_tensors(pairs, tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        chosen, rejected = answer_logps(policy, batch)
    counts = (batch["labels"][:, 1:] != -100).sum(-1).float().chunk(2)
    return chosen / counts[0], rejected / counts[1], batch


def _on_cpu(**settings):
    """What TRL's loss methods read from their trainer: its settings and the accelerator's device."""
    from types import SimpleNamespace

    return SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu")), **settings)


def test_orpo_loss_equals_trl_and_its_nll_the_answer_tokens(tiny_llama, tokenizer):
    """ORPO's odds-ratio term is TRL's ``ORPOTrainer.odds_ratio_loss`` on the same mean answer
    log-probabilities (TRL returns +beta log s(log OR), which its trainer subtracts). Its NLL is
    LLaMA-Factory's, the chosen answers' tokens only: checked against transformers' own loss of
    each chosen sequence (the mean over its label tokens), averaged over the pairs."""
    from trl.experimental.orpo import ORPOTrainer

    from hwft.methods.orpo import OrpoSpec
    from hwft_torch.orpo import OddsRatio

    policy, _ = _models(tiny_llama)
    pairs = _pairs(tokenizer)
    chosen, rejected, batch = _mean_answer_logps(policy, tokenizer, pairs)
    beta = 0.3
    trl_losses, chosen_rewards, rejected_rewards, _, log_odds = ORPOTrainer.odds_ratio_loss(
        _on_cpu(beta=beta), chosen, rejected
    )
    with torch.no_grad():
        nll = sum(
            policy(input_ids=torch.tensor([p.chosen.input_ids]), labels=torch.tensor([p.chosen.labels])).loss
            for p in pairs
        ) / len(pairs)
    objective = OddsRatio(None, OrpoSpec(beta=beta), 1, tokenizer.pad_token_id, torch.device("cpu"))
    got = objective.loss(policy, (pairs, len(pairs))).value.item()
    assert got == pytest.approx((nll - trl_losses.mean()).item(), abs=1e-5)
    metrics = objective.log_metrics()
    assert metrics["nll"] == pytest.approx(nll.item(), abs=1e-5)
    assert metrics["log_odds"] == pytest.approx(log_odds.item(), abs=1e-5)
    assert metrics["rewards/margins"] == pytest.approx((chosen_rewards - rejected_rewards).mean().item(), abs=1e-5)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_simpo_loss_equals_trl(tiny_llama, tokenizer, smoothing):
    """SimPO is TRL's ``CPOTrainer.cpo_loss`` with ``loss_type="simpo"`` and no NLL term
    (``cpo_alpha=0``; TRL's trainer adds cpo_alpha x NLL after this function, 1.0 by default),
    on the same mean answer log-probabilities."""
    from trl.experimental.cpo import CPOTrainer

    from hwft.methods.simpo import SimpoSpec
    from hwft_torch.simpo import SimpleMargin

    policy, _ = _models(tiny_llama)
    pairs = _pairs(tokenizer)
    chosen, rejected, _ = _mean_answer_logps(policy, tokenizer, pairs)
    beta, gamma = 2.0, 0.7
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(
        _on_cpu(alpha=0.0, beta=beta, simpo_gamma=gamma, loss_type="simpo", label_smoothing=smoothing), chosen, rejected
    )
    objective = SimpleMargin(
        None,
        SimpoSpec(beta=beta, gamma=gamma, label_smoothing=smoothing),
        1,
        tokenizer.pad_token_id,
        torch.device("cpu"),
    )
    assert objective.loss(policy, (pairs, len(pairs))).value.item() == pytest.approx(losses.mean().item(), abs=1e-5)
    metrics = objective.log_metrics()
    assert metrics["rewards/chosen"] == pytest.approx(chosen_rewards.mean().item(), abs=1e-5)
    assert metrics["rewards/rejected"] == pytest.approx(rejected_rewards.mean().item(), abs=1e-5)


def _feedback(tokenizer):
    """Four feedback answers, paired as TRL pairs a micro-batch of four (each prompt with the
    previous row's answer, the first with the last's): hwft's data-time pairing of these rows."""

    renderer = ChatRenderer(tokenizer, tokenizer.chat_template)
    rows = [
        ("What is the capital of France?", "Paris.", True),
        ("Say hello.", "No.", False),
        ("Name a colour.", "Blue, like the sky at noon.", True),
        ("Count to three.", "Three, two, one, zero.", False),
    ]
    examples = [
        FeedbackExample([{"role": "user", "content": q}], completion=[{"role": "assistant", "content": a}], label=label)
        for q, a, label in rows
    ]
    items, _ = feedback_items(examples, renderer, 512)
    return items


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33)])
def test_kto_loss_equals_trl(tiny_llama, tokenizer, tmp_path, weights):
    """KTO is ``trl.KTOTrainer.compute_loss`` on the same sequences: the answers and TRL's
    mismatched pairs (completions rotated by one within the micro-batch), against a reference
    that differs from the policy, so the KL baseline is not 0."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    from hwft.methods.kto import KtoSpec
    from hwft_torch.kto import Feedback, sequence_tensors
    from hwft_torch.modeling import Reference

    # The perturbed copy as the reference: the policy then out-scores it on the mismatched pairs
    # too, so the KL baseline is above its clamp at 0.
    reference, policy = _models(tiny_llama)
    items = _feedback(tokenizer)
    beta, (desirable_weight, undesirable_weight) = 0.3, weights
    trainer = KTOTrainer(
        model=policy,
        ref_model=reference,
        args=KTOConfig(
            output_dir=str(tmp_path),
            beta=beta,
            desirable_weight=desirable_weight,
            undesirable_weight=undesirable_weight,
            report_to=[],
            per_device_train_batch_size=4,
            use_cpu=True,
            bf16=False,
        ),
        train_dataset=Dataset.from_list(
            [{"prompt": "a", "completion": "b", "label": True}, {"prompt": "c", "completion": "d", "label": False}]
        ),
        processing_class=tokenizer,
    )
    policy.train()
    own = sequence_tensors([i.sequence for i in items], tokenizer.pad_token_id, torch.device("cpu"))
    other = sequence_tensors([i.mismatched for i in items], tokenizer.pad_token_id, torch.device("cpu"))
    inputs = {
        "input_ids": own["input_ids"],
        "attention_mask": own["attention_mask"],
        "completion_mask": (own["labels"] != -100).long(),
        "KL_input_ids": other["input_ids"],
        "KL_attention_mask": other["attention_mask"],
        "KL_completion_mask": (other["labels"] != -100).long(),
        "label": torch.tensor([i.desirable for i in items]),
    }
    expected = trainer.compute_loss(trainer.model, inputs).item()
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert logged["kl"] > 0, "the reference must differ so that the KL baseline counts"

    spec = KtoSpec(beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    objective = Feedback(
        None, spec, 1, tokenizer.pad_token_id, torch.device("cpu"), Reference(policy, copy_of=reference)
    )
    got = objective.loss(policy, (items, len(items))).value.item()
    assert got == pytest.approx(expected, abs=1e-5)
    metrics = objective.log_metrics()
    for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert metrics[key] == pytest.approx(logged[key], abs=1e-5), key


@pytest.mark.parametrize("margin, center", [(0.0, 0.0), (0.5, 0.01)])
def test_reward_model_loss_equals_trl(tiny_llama, tokenizer, tmp_path, margin, center):
    """rm is ``trl.RewardTrainer.compute_loss`` on the same sequences: the Bradley-Terry loss of
    the score head's rewards at each row's last token, with TRL's margin input and its
    center_rewards_coefficient; accuracy and margin as TRL logs them."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from hwft.methods.rm import RmSpec
    from hwft_torch.dpo import pair_tensors
    from hwft_torch.rm import RewardModel

    torch.manual_seed(5)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    with torch.no_grad():  # a head that tells the answers apart, so the loss is not ln 2
        model.score.weight.normal_(0, 1.0)
    pairs = _pairs(tokenizer)
    trainer = RewardTrainer(
        model=model,
        args=RewardConfig(
            output_dir=str(tmp_path),
            center_rewards_coefficient=center or None,
            report_to=[],
            per_device_train_batch_size=2,
            use_cpu=True,
            bf16=False,
        ),
        train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2),
        processing_class=tokenizer,
    )
    model.train()
    batch = pair_tensors(pairs, tokenizer.pad_token_id, torch.device("cpu"))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if margin:
        inputs["margin"] = torch.full((len(pairs),), margin)
    expected = trainer.compute_loss(trainer.model, inputs).item()
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    objective = RewardModel(
        None, RmSpec(margin=margin, center_rewards_coefficient=center), 1, tokenizer.pad_token_id, torch.device("cpu")
    )
    got = objective.loss(model, (pairs, len(pairs))).value.item()
    assert got == pytest.approx(expected, abs=1e-5)
    assert abs(expected - 0.6931) > 1e-2, "the rewards must differ so the loss is not ln 2"
    metrics = objective.log_metrics()
    assert metrics["rewards/accuracy"] == pytest.approx(logged["accuracy"], abs=1e-6)
    assert metrics["rewards/margins"] == pytest.approx(logged["margin"], abs=1e-5)


def test_ppo_follows_its_formulas_written_out():
    """PPO's numbers on hand-built inputs, against the formulas written out here token by token
    (TRL 1.16 ships no PPO trainer to compare with): the KL-penalised per-token rewards, GAE,
    whitening over every micro-batch's tokens, the clipped policy and value losses; to 1e-5."""
    import math

    import numpy as np

    from hwft.methods.ppo import PpoSpec, gae, rollout_targets, token_rewards, whiten
    from hwft_torch.losses import ppo_loss

    rng = np.random.default_rng(0)
    spec = PpoSpec(kl_coef=0.1, gamma=0.9, lam=0.8, cliprange=0.2, cliprange_value=0.3, vf_coef=0.5)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=np.float64)
    logps, ref, values = (rng.normal(-1, 0.5, (3, 4)) for _ in range(3))
    scores = np.array([1.0, -0.5, 0.25])

    want_rewards = np.zeros((3, 4))
    want_adv, want_ret = np.zeros((3, 4)), np.zeros((3, 4))
    for i in range(3):
        T = int(mask[i].sum())
        for t in range(T):
            want_rewards[i, t] = -0.1 * (logps[i, t] - ref[i, t]) + (scores[i] if t == T - 1 else 0.0)
        running = 0.0
        for t in reversed(range(T)):
            following = values[i, t + 1] if t + 1 < T else 0.0
            running = want_rewards[i, t] + 0.9 * following - values[i, t] + 0.9 * 0.8 * running
            want_adv[i, t], want_ret[i, t] = running, running + values[i, t]
    rewards = token_rewards(scores, logps, ref, mask, 0.1)
    np.testing.assert_allclose(rewards, want_rewards, atol=1e-12)
    adv, ret = gae(rewards, values, mask, 0.9, 0.8)
    np.testing.assert_allclose(adv, want_adv, atol=1e-12)
    np.testing.assert_allclose(ret, want_ret, atol=1e-12)
    real = [want_adv[i, t] for i in range(3) for t in range(4) if mask[i, t]]
    mean = sum(real) / len(real)
    std = math.sqrt(sum((a - mean) ** 2 for a in real) / (len(real) - 1) + 1e-8)
    want_white = np.where(mask > 0, (want_adv - mean) / std, 0.0)
    # whitening spans micro-batches: split the rows in two, the statistics are still the batch's
    halves = whiten([adv[:2], adv[2:]], [mask[:2], mask[2:]])
    np.testing.assert_allclose(np.concatenate(halves), want_white, atol=1e-12)
    batch = [{"scores": scores, "logps": logps, "ref_logps": ref, "values": values, "mask": mask}]
    ((got_adv, got_ret),) = rollout_targets(batch, spec)
    np.testing.assert_allclose(got_adv, want_white, atol=1e-12)
    np.testing.assert_allclose(got_ret, want_ret, atol=1e-12)

    new_logps = logps + rng.normal(0, 0.4, (3, 4))  # ratios well outside [0.8, 1.2] for some tokens
    new_values = values + rng.normal(0, 0.5, (3, 4))
    total, clipped = 0.0, 0
    for i in range(3):
        for t in range(4):
            if not mask[i, t]:
                continue
            ratio, a = math.exp(new_logps[i, t] - logps[i, t]), want_white[i, t]
            policy = max(-a * ratio, -a * min(max(ratio, 0.8), 1.2))
            v, v_old, g = new_values[i, t], values[i, t], want_ret[i, t]
            v_clip = v_old + min(max(v - v_old, -0.3), 0.3)
            value = 0.5 * max((v - g) ** 2, (v_clip - g) ** 2)
            total += policy + 0.5 * value
            clipped += (ratio < 0.8 and a < 0) or (ratio > 1.2 and a > 0)
    tokens = int(mask.sum())
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    loss, stats = ppo_loss(
        t(new_logps),
        t(logps),
        t(new_values),
        t(values),
        t(want_ret),
        t(want_white),
        t(mask),
        0.2,
        0.3,
        0.5,
        float(tokens),
    )
    assert loss.item() == pytest.approx(total / tokens, abs=1e-5)
    assert 0 < clipped == int(stats["clipped"]) and int(stats["tokens"]) == tokens
