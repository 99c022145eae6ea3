"""Using what was trained (issue 11): hwft chat, serve, eval and export, and experiment tracking.

One tiny Llama LoRA run (with a held-out split and all three trackers) and one tiny Qwen2 full
fine-tune are trained through the real CLI; every command then works on those outputs. The
tiny models use rope_theta 50000, not the default 10000: transformers 5 nests it in
``rope_parameters``, and both the GGUF writer and mlx-lm once read the default instead.
"""

from __future__ import annotations

import io
import json
import math
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import SAMPLE_ROWS, build_tiny_model, write_jsonl, write_recipe

ROPE = {"rope_theta": 50000.0}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tokenizer_dir, monkeypatch_module):
    """A tiny Llama LoRA run: 4 steps, 2 of the 12 examples held out (data.val_size) and
    evaluated every 2 steps, metrics sent to tensorboard, wandb (offline) and mlflow."""
    from hwft import cli as hwft_cli
    from hwft.plugins import reset_host

    folder = tmp_path_factory.mktemp("use-lora")
    model = build_tiny_model("llama", folder / "model", tokenizer_dir, seed=3, **ROPE)
    recipe = write_recipe(
        folder,
        model,
        train={"max_steps": 4, "eval_every": 2, "lr": 5e-3},
        output={"dir": str(folder / "out"), "report_to": ["tensorboard", "wandb", "mlflow"], "project": "hwft-tests"},
    )
    write_jsonl(folder / "train.jsonl", SAMPLE_ROWS * 2)
    raw = recipe.read_text().replace("data:\n", "data:\n  val_size: 2\n", 1)
    recipe.write_text(raw)
    monkeypatch_module.setenv("WANDB_MODE", "offline")
    monkeypatch_module.setenv("WANDB_SILENT", "true")
    reset_host()
    assert hwft_cli.main(["train", str(recipe), "--quiet"]) == 0
    return folder / "out"


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tokenizer_dir):
    """A tiny Qwen2 full fine-tune (model/ instead of adapter/), 2 steps."""
    from hwft import cli as hwft_cli
    from hwft.plugins import reset_host

    folder = tmp_path_factory.mktemp("use-full")
    model = build_tiny_model("qwen2", folder / "model", tokenizer_dir, seed=4, **ROPE)
    recipe = write_recipe(
        folder, model, method={"objective": "sft", "tuning": "full"}, train={"max_steps": 2, "lr": 1e-3}
    )
    reset_host()
    assert hwft_cli.main(["train", str(recipe), "--quiet"]) == 0
    return folder / "out"


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def session(lora_run):
    from hwft.inference import open_session, open_trained

    return open_session(open_trained(lora_run), "cpu")


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# Tracking


def test_trackers_receive_every_metrics_line(lora_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lines = metrics(lora_run)
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert all(r["peak_memory_bytes"] > 0 for r in lines)
    evals = [json.loads(x) for x in (lora_run / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 4] and all(e["examples"] == 2 for e in evals)

    board = EventAccumulator(str(lora_run / "tensorboard")).Reload()
    assert [(s.step, round(s.value, 5)) for s in board.Scalars("train/loss")] == [
        (r["step"], round(r["loss"], 5)) for r in lines
    ]
    assert [s.step for s in board.Scalars("eval/loss")] == [2, 4]
    assert {"train/lr", "train/grad_norm", "train/tokens_per_second", "train/peak_memory_bytes"} <= set(
        board.Tags()["scalars"]
    )

    # wandb's offline log (written by its Go core, which ships no Python reader): every value logged
    (log,) = (lora_run / "wandb").glob("offline-run-*/run-*.wandb")
    raw = log.read_bytes()
    assert b"train/loss" in raw and b"eval/loss" in raw
    assert all(json.dumps(r["loss"]).encode() in raw for r in lines)

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{lora_run / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("hwft-tests").experiment_id])
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, round(m.value, 5)) for m in history] == [(r["step"], round(r["loss"], 5)) for r in lines]
    assert run.data.params["method.tuning"] == "lora" and run.info.status == "FINISHED"


def test_method_metrics_reach_the_tracker(cli, tmp_path, tiny_llama):
    """DPO's rewards and margins arrive as train/rewards/...; the same for any method's keys."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.test_methods import PAIRS

    write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    recipe = write_recipe(
        tmp_path,
        tiny_llama,
        data={"train": [{"path": "pairs.jsonl"}]},
        method={"objective": "dpo", "tuning": "lora"},
        train={"max_steps": 2, "micro_batch_size": 2},
        output={"dir": str(tmp_path / "out"), "report_to": ["tensorboard"]},
    )
    code, _, err = cli("train", recipe, "--quiet")
    assert code == 0, err
    lines = metrics(tmp_path / "out")
    board = EventAccumulator(str(tmp_path / "out" / "tensorboard")).Reload()
    for key in ("rewards/chosen", "rewards/margins", "rewards/accuracy"):
        assert [round(s.value, 5) for s in board.Scalars(f"train/{key}")] == [round(r[key], 5) for r in lines]
    # the recipe, as TensorBoard's text plugin reads it (hwft writes events without torch)
    (recipe_text,) = board.Tensors("recipe/text_summary")
    assert b"objective: dpo" in recipe_text.tensor_proto.string_val[0]


def test_unknown_or_missing_tracker_is_refused_before_training(cli, tmp_path, tiny_llama):
    recipe = write_recipe(tmp_path, tiny_llama, output={"dir": str(tmp_path / "out"), "report_to": ["tensorbord"]})
    code, _, err = cli("train", recipe)
    assert code == 2 and "output.report_to: unknown tracker 'tensorbord'" in err and "tensorboard" in err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# Opening a result


def test_open_trained_names_what_it_found_or_what_it_expected(lora_run, full_run, tmp_path):
    from hwft.errors import ModelError
    from hwft.inference import open_trained

    lora = open_trained(lora_run)
    assert lora.adapter == (lora_run / "adapter").resolve() and lora.weights.name == "model"
    assert open_trained(lora_run / "adapter").weights == lora.weights  # adapter's base_model_name_or_path
    full = open_trained(full_run)
    assert full.adapter is None and full.weights == full_run / "model"
    # a recipe names the run it wrote (hwft eval RECIPE_OR_OUTPUT)
    assert open_trained(full_run.parent / "recipe.yaml").weights == full.weights
    (tmp_path / "recipe.yaml").write_text((lora_run / "recipe.yaml").read_text())
    (tmp_path / "checkpoints" / "step-2").mkdir(parents=True)
    with pytest.raises(ModelError, match="holds no adapter/ or model/ yet.*checkpoints/step-2"):
        open_trained(tmp_path)
    with pytest.raises(ModelError, match="neither a run folder"):
        open_trained(tmp_path / "checkpoints")


# --------------------------------------------------------------------------------------------
# chat


def test_chat_prompt_stdin_and_interactive(cli, lora_run, session, monkeypatch):
    from hwft.inference import Sampling

    sampling = Sampling(max_new_tokens=12)

    def raw(messages) -> str:  # what chat prints for one reply (the random tiny model may say "\n\n")
        return "".join(session.stream(messages, sampling)) + "\n"

    ask = [{"role": "user", "content": "Who are you?"}]
    code, out, err = cli("chat", lora_run, "--prompt", "Who are you?", "--max-new-tokens", "12")
    assert code == 0 and out == raw(ask) and "on cpu" in err

    monkeypatch.setattr("sys.stdin", io.StringIO("Who are you?\n"))
    code, out, _ = cli("chat", lora_run, "--max-new-tokens", "12")  # piped stdin: one message
    assert code == 0 and out == raw(ask)

    turns = "Who are you?\n/system Be brief.\nName?\n/reset\n/nonsense\nWho are you?\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(turns))
    code, out, err = cli("chat", lora_run, "--interactive", "--max-new-tokens", "12")
    assert code == 0 and "system prompt set" in err and "conversation forgotten" in err and "unknown command" in err
    system = [{"role": "system", "content": "Be brief."}]
    first = session.reply(ask, sampling)
    history = [*ask, {"role": "assistant", "content": first}, {"role": "user", "content": "Name?"}]
    # the history carries on; after /reset the system prompt stays and the history goes
    assert out == raw(ask) + raw([*system, *history]) + raw([*system, *ask])


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus():
    import numpy as np

    from hwft.inference import Sampling, pick_token

    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert pick_token(logits, Sampling(temperature=0), None) == 0
    draw = [pick_token(logits, Sampling(temperature=1.0, top_p=0.7), np.random.default_rng(s)) for s in range(200)]
    assert set(draw) == {0, 1}  # 0.5 + 0.3 reaches 0.7; 2 and 3 are cut
    again = [pick_token(logits, Sampling(temperature=1.0, top_p=0.7), np.random.default_rng(s)) for s in range(200)]
    assert draw == again


def test_mlx_session_scores_like_torch(lora_run, session):
    """The same trained adapter on both engines: logits within 1e-4 of the largest."""
    import numpy as np

    from hwft.inference import open_session, open_trained

    mlx = open_session(open_trained(lora_run), "mlx")
    ids = session.prompt_ids("Who are you?")
    a, b = session.logits(ids), mlx.logits(ids)
    assert np.abs(a - b).max() / np.abs(a).max() < 1e-4


# --------------------------------------------------------------------------------------------
# serve


@pytest.fixture(scope="module")
def server(session):
    from hwft.use.serve import make_server

    httpd = make_server(session, "127.0.0.1", 0, "tiny")
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def post(url: str, body) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_serve_answers_openai_chat_completions(server, session):
    from hwft.inference import Sampling

    messages = [{"role": "user", "content": "Who are you?"}]
    want = "".join(session.stream(messages, Sampling(max_new_tokens=10)))  # served as generated, unstripped
    with urllib.request.urlopen(f"{server}/v1/models", timeout=10) as r:
        assert json.load(r)["data"][0]["id"] == "tiny"

    status, raw = post(
        f"{server}/v1/chat/completions", {"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": 10}
    )
    body = json.loads(raw)
    assert status == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": want}
    assert body["usage"]["prompt_tokens"] == len(session.prompt_ids(messages))
    assert body["usage"]["completion_tokens"] <= 10

    status, raw = post(
        f"{server}/v1/chat/completions", {"messages": messages, "temperature": 0, "max_tokens": 10, "stream": True}
    )
    events = [line.removeprefix("data: ") for line in raw.decode().split("\n\n") if line.startswith("data: ")]
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")

    cut = want[len(want) // 2 :][:2]
    if cut:  # a stop string ends the reply before it, finish_reason stop
        status, raw = post(
            f"{server}/v1/chat/completions", {"messages": messages, "temperature": 0, "max_tokens": 10, "stop": [cut]}
        )
        choice = json.loads(raw)["choices"][0]
        assert choice["message"]["content"] == want[: want.index(cut)] and choice["finish_reason"] == "stop"


@pytest.mark.parametrize(
    "body, message",
    [
        ({"messages": "hi"}, "messages: give a non-empty list"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0]: role must be"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n: only 1"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, "temperature: give a number >= 0"),
    ],
)
def test_serve_refuses_bad_requests_with_400(server, body, message):
    status, raw = post(f"{server}/v1/chat/completions", body)
    assert status == 400 and message in json.loads(raw)["error"]["message"]


# --------------------------------------------------------------------------------------------
# eval


def test_eval_scores_base_and_fine_tuned_on_the_held_out_split(cli, lora_run):
    code, out, _ = cli("eval", lora_run, "--json", "--max-new-tokens", "8")
    report = json.loads(out)
    assert code == 0 and report["schema"] == "hwft.eval/1" and report["examples"] == 2
    base, tuned = report["results"]["base"], report["results"]["fine-tuned"]
    # the same held-out rows, the same loss as training's last evaluation
    last_eval = json.loads((lora_run / "eval.jsonl").read_text().splitlines()[-1])["eval_loss"]
    assert tuned["loss"] == pytest.approx(last_eval, rel=1e-4)
    assert tuned["perplexity"] == pytest.approx(math.exp(tuned["loss"]), rel=1e-6)
    assert tuned["loss"] < base["loss"]  # 4 steps at lr 5e-3 on these rows
    for result in (base, tuned):
        assert result["generated"] == 2 and 0 <= result["rouge_l"] <= 1 and 0 <= result["exact_match"] <= 1

    code, out, _ = cli("eval", lora_run, "--no-base", "--max-new-tokens", "4", "--limit", "1")
    assert code == 0 and "| eval loss |" in out and "base" not in out.split("\n")[0]


def test_generation_scores_are_the_libraries():
    from hwft.use.evaluate import generation_scores

    same = generation_scores(["Paris is the capital."], ["Paris  is the capital."])
    assert same["exact_match"] == 1.0 and same["rouge_l"] == pytest.approx(1.0) and same["bleu"] == pytest.approx(100.0)
    other = generation_scores(["I like cats", "x"], ["I like dogs", "y"])
    assert other["exact_match"] == 0.0 and other["rouge_l"] == pytest.approx((2 / 3 + 0) / 2)


def test_eval_without_data_says_what_to_give(cli, full_run):
    code, _, err = cli("eval", full_run)
    assert code == 2 and "give --data FILE" in err


def test_val_size_must_leave_examples_on_both_sides(cli, tmp_path, tiny_llama):
    recipe = write_recipe(tmp_path, tiny_llama, data={"train": [{"path": "train.jsonl"}], "val_size": 6})
    code, _, err = cli("train", recipe)
    assert code == 2 and "data.val_size 6 holds out 6 of 6" in err


# --------------------------------------------------------------------------------------------
# export


@pytest.mark.parametrize(
    "to, extra",
    [("hf", []), ("peft", []), ("mlx", []), ("gguf", ["--gguf-type", "f16"]), ("gguf", ["--gguf-type", "q8_0"])],
)
def test_export_reloads_with_the_same_logits(cli, lora_run, tmp_path, to, extra):
    out = tmp_path / ("model.gguf" if to == "gguf" else to)
    code, stdout, err = cli("export", lora_run, "--to", to, "--out", out, "--verify", *extra)
    report = json.loads(stdout)
    assert code == 0, err
    assert report["ok"] and report["argmax_agreement"] == 1.0, report
    assert out.exists() and not list(tmp_path.glob(".*tmp*"))
    if to == "hf":
        assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}


def test_export_qwen2_full_fine_tune_to_gguf_and_hf(cli, full_run, tmp_path):
    for to, out in (("gguf", tmp_path / "q.gguf"), ("hf", tmp_path / "hf")):
        code, stdout, err = cli("export", full_run, "--to", to, "--out", out, "--verify", "--gguf-type", "f16")
        assert code == 0 and json.loads(stdout)["ok"], err
    from gguf import GGUFReader

    from hwft.use.gguf_writer import pre_tokenizer_name

    fields = GGUFReader(str(tmp_path / "q.gguf")).fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "qwen2"
    assert float(fields["qwen2.rope.freq_base"].parts[-1][0]) == 50000.0
    tokenizer = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
    assert bytes(fields["tokenizer.ggml.pre"].parts[-1]).decode() == pre_tokenizer_name(tokenizer)


#: An export format of a vendor's: its own setting (level) is declared by its exporter, and the
#: CLI offers it as --notes-level with the exporter's choices and help.
NOTES_EXPORTER = """
    from typing import Literal
    import pluggy
    from pydantic import Field
    from hwft.section import Section
    from hwft.use.exporters import Exporter
    HWFT_PLUGIN_API = "2.0"
    hookimpl = pluggy.HookimplMarker("hwft")

    class NotesOptions(Section):
        level: Literal[1, 2, 3] = Field(1, description="how much to write")

    def write(trained, staged, options):
        staged.write_text(f"{trained.label} level {options.settings.level}")
        return staged

    @hookimpl
    def hwft_register_exporters(register):
        register(Exporter("notes", "torch", "a line about the result", write, lambda path, ids, trained: None,
                          name=lambda options: "notes.txt", single_file=True, options=NotesOptions))
"""


def test_an_exporter_declares_its_own_options(cli, lora_run, tmp_path, monkeypatch, capsys):
    """A format's settings are its exporter's (hwft.use.exporters.Exporter.options): the CLI's
    flags come from the registry, gguf's --gguf-type as a vendor's --notes-level."""
    from tests.test_plugins import make_dist

    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    make_dist(site, "hwft-notes", "fake_notes", NOTES_EXPORTER)
    with pytest.raises(SystemExit) as done:  # argparse's --help
        cli("export", "--help")
    out = capsys.readouterr().out
    assert done.value.code == 0 and "--notes-level {1,2,3}" in out and "--gguf-type {f16,q8_0}" in out, out
    assert "--to notes: how much to write; default 1" in " ".join(out.split())
    code, _, err = cli("export", lora_run, "--to", "notes", "--notes-level", "3", "--out", tmp_path / "n.txt")
    assert code == 0, err
    assert (tmp_path / "n.txt").read_text().endswith("level 3")
    with pytest.raises(SystemExit) as done:
        cli("export", lora_run, "--to", "notes", "--notes-level", "4", "--out", tmp_path / "m.txt")
    assert done.value.code == 2 and "argument --notes-level: invalid choice: 4" in capsys.readouterr().err


def test_export_refusals(cli, lora_run, full_run, tmp_path):
    code, _, err = cli("export", full_run, "--to", "peft", "--out", tmp_path / "a")
    assert code == 2 and "is a full model, not an adapter; use --to hf" in err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep me")
    code, _, err = cli("export", lora_run, "--to", "hf", "--out", tmp_path / "taken")
    assert code == 2 and "exists; choose another --out, or pass --overwrite" in err
    assert (tmp_path / "taken" / "x").read_text() == "keep me"
    code, _, err = cli("export", tmp_path / "nowhere", "--to", "hf", "--out", tmp_path / "b")
    assert code == 2 and "not found" in err
