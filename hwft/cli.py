"""The ``hwft`` command: train, chat, serve, eval, export, bench, data inspect, env, plugins.

A user error (bad recipe, bad data, impossible combination) exits with code 2 and one message,
without a traceback unless ``--debug``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from hwft import HWFT_PLUGIN_API, __version__
from hwft.entry import guarded, leave_out_unneeded_imports, start_process
from hwft.environment import ENV_SCHEMA, env_report
from hwft.errors import UserError

#: Versioned schemas of the --json outputs (documented in the README).
PLUGINS_SCHEMA = "hwft.plugins/1"


def add_exporter_flags(export: argparse.ArgumentParser) -> None:
    """Each registered exporter's own settings as ``--<format>-<field>`` (hwft.use.exporters):
    typed, with the choices and help its Section declares."""
    import types
    import typing

    from hwft.plugins import get_host

    for flag, (fmt, name, info) in get_host().exporters().flags().items():
        annotation = info.annotation
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # X | None: X
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        choices = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else None
        kind = type(choices[0]) if choices else (annotation if isinstance(annotation, type) else str)
        default = "" if info.default is None else f"; default {info.default}"
        export.add_argument(
            flag,
            dest=f"export_{fmt}__{name}",
            type=kind,
            choices=choices,
            default=None,
            help=f"--to {fmt}: {info.description or name}{default}",
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hwft", description="One fine-tuning recipe, any hardware.")
    parser.add_argument("--version", action="version", version=f"hwft {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune as a recipe says")
    train.add_argument("recipe", help="recipe YAML file")
    train.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.lr=5e-5")
    train.add_argument("--dry-run", action="store_true", help="validate and print the plan only")
    train.add_argument("--quiet", action="store_true", help="print nothing but errors")
    train.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="PATH",
        help="continue from the newest checkpoint in output.dir, or from PATH (a "
        "checkpoints/step-N folder or a run folder)",
    )
    train.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    launch = train.add_argument_group(
        "launch",
        "start several training processes with the backend's own launcher (torchrun for "
        "torch backends, mlx.launch for MLX); parallel.strategy says how they share the work",
    )
    launch.add_argument(
        "--nproc",
        type=int,
        help="processes on this machine, one per device (default 1, or what parallel.accelerate_config says)",
    )
    launch.add_argument("--nnodes", type=int, help="machines taking part (default 1)")
    launch.add_argument("--node-rank", type=int, help="this machine's index, 0 to nnodes-1 (default 0)")
    launch.add_argument("--master-addr", help="address of node 0, reachable from every node")
    launch.add_argument("--master-port", type=int, help="port on node 0 (default 29500)")

    imp = sub.add_parser(
        "import",
        help="print the hwft recipe a LLaMA-Factory training YAML becomes (`hwft train lf.yaml` trains it directly)",
    )
    imp.add_argument("recipe", help="a LLaMA-Factory training YAML (llamafactory-cli train's file)")
    imp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

    plan = sub.add_parser(
        "plan",
        help="the memory each device needs under each parallel strategy, before "
        "anything loads, and which strategies fit",
    )
    plan.add_argument("recipe", help="recipe YAML file")
    plan.add_argument("overrides", nargs="*", help="key.path=value overrides")
    plan.add_argument(
        "--devices", help="COUNTxSIZE, e.g. 8x80GB or 2x24GB (default: this machine's devices of the recipe's backend)"
    )
    plan.add_argument("--json", action="store_true", help="machine-readable (hwft.plan/1)")
    plan.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

    data = sub.add_parser("data", help="look at a recipe's data")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    inspect = data_sub.add_parser(
        "inspect", help="rows as the model sees them, trained tokens highlighted, lengths, packing"
    )
    inspect.add_argument("recipe", help="recipe YAML file")
    inspect.add_argument("overrides", nargs="*", help="key.path=value overrides")
    inspect.add_argument("--rows", type=int, default=3, help="how many rows to show (default 3)")
    inspect.add_argument("--json", action="store_true", help="machine-readable (hwft.data-inspect/1)")
    inspect.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

    env = sub.add_parser("env", help="backends on this machine and what each can do")
    env.add_argument("--json", action="store_true", help=f"machine-readable ({ENV_SCHEMA})")
    env.add_argument(
        "--families",
        action="store_true",
        help="which model family gets which fast paths on which engine, as a Markdown table",
    )
    env.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

    bench = sub.add_parser(
        "bench",
        help="time a recipe on each backend (and against the transformers baseline); "
        "`hwft bench report FILES` compares results",
        description="hwft bench RECIPE [options]  |  hwft bench report FILES [--out DIR] [--force]  |  "
        "hwft bench schema",
    )
    bench.add_argument("recipe", help="recipe YAML file (or `report`, `schema`)")
    bench.add_argument("overrides", nargs="*", help="key.path=value overrides; after `report`: result files")
    bench.add_argument("--backends", help="comma-separated backends (default: every available one that can run it)")
    bench.add_argument("--steps", type=int, help="timed steps after warmup (default: the recipe's whole run)")
    bench.add_argument("--warmup", type=int, default=2, help="steps run before timing starts (default 2)")
    bench.add_argument(
        "--baseline",
        type=lambda v: [x.strip() for x in v.split(",") if x.strip()],
        help="also run the transformers Trainer + peft baselines, comma-separated: hf (SDPA), "
        "hf-liger (with Liger's kernels: CUDA, ROCm); settings from the recipe's bench.baseline",
    )
    bench.add_argument("--baseline-bf16", action="store_true", help="also run the baseline's bf16 variant")
    bench.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds of every arm, alternating hwft and baseline; prints the median of the paired ratios (default 1)",
    )
    bench.add_argument(
        "--eval-examples",
        type=int,
        default=32,
        help="examples held out from the end of the data for the eval loss (default 32; data.eval replaces them)",
    )
    bench.add_argument("--out", help="folder for results (default bench-results) or for the report")
    bench.add_argument("--force", action="store_true", help="report: put different workloads in one table")
    bench.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

    def using(name: str, help: str) -> argparse.ArgumentParser:
        """A command that loads a trained model: what to load, and on which backend."""
        cmd = sub.add_parser(name, help=help)
        cmd.add_argument(
            "target",
            help="a run folder (output.dir) or the recipe that wrote it, a checkpoints/step-N "
            "folder, an adapter folder, a model folder, or a model name such as smollm2-135m",
        )
        cmd.add_argument("--backend", default="auto", help="backend to load on (default auto: the best available)")
        cmd.add_argument(
            "--precision",
            default="auto",
            choices=("auto", "fp32", "bf16", "fp16"),
            help="weights' dtype (auto: bf16 on accelerators that have it, else as saved)",
        )
        cmd.add_argument("--base", help="the base model of an adapter, where its run folder does not say")
        cmd.add_argument("--trust-remote-code", action="store_true", help="run a model folder's own Python code")
        cmd.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
        return cmd

    def sampling(cmd: argparse.ArgumentParser, temperature: float) -> None:
        cmd.add_argument("--max-new-tokens", type=int, default=256, help="reply length limit (default 256)")
        cmd.add_argument(
            "--temperature",
            type=float,
            default=temperature,
            help=f"0 is greedy; above 0 samples softmax(logits/T) (default {temperature})",
        )
        cmd.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
        cmd.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")

    chat = using("chat", "talk to a trained model, replies streamed")
    chat.add_argument("--system", help="system prompt")
    chat.add_argument(
        "--prompt",
        help="answer this one message and exit ('-': read it from stdin); a piped stdin is read the same way",
    )
    chat.add_argument(
        "--image",
        action="append",
        default=[],
        help="an image for --prompt (a file, or a data: URL; repeat for several): where the prompt's <image> "
        "placeholders stand, else before its text; a vision-language model of hwft.vision's table",
    )
    chat.add_argument(
        "--video",
        action="append",
        default=[],
        help="a video for --prompt (a file; repeat for several): where the prompt's <video> placeholders stand, "
        "else before its text; frames sampled as for training (2 a second, at most 128); Qwen's VL families",
    )
    chat.add_argument("--interactive", action="store_true", help="a conversation even when stdin is not a terminal")
    sampling(chat, 0.0)

    serve = using("serve", "an OpenAI-compatible chat-completions endpoint on localhost")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    serve.add_argument("--model-name", default="hwft", help="the model id clients name (default hwft)")
    serve.add_argument(
        "--images-from",
        help="a folder whose images requests may name by path in image_url parts (default: data: URLs only)",
    )

    evaluate = using("eval", "loss, perplexity and answer quality (exact match, ROUGE-L, BLEU), base vs fine-tuned")
    evaluate.add_argument("--data", nargs="+", help="evaluation files (default: the run's data.eval and data.val_size)")
    evaluate.add_argument("--no-base", action="store_true", help="skip the base model's column")
    evaluate.add_argument("--limit", type=int, default=100, help="answers generated and scored (default 100)")
    evaluate.add_argument("--max-new-tokens", type=int, default=128, help="answer length limit (default 128)")
    evaluate.add_argument("--max-length", type=int, help="token limit of a scored row (default: the run's)")
    evaluate.add_argument("--batch-size", type=int, default=4, help="rows per forward for the loss (default 4)")
    evaluate.add_argument("--json", action="store_true", help="print the report as JSON (hwft.eval/1)")
    evaluate.add_argument("--out", help="also write the JSON report to this file")

    export = using("export", "write a trained result as a merged HF model, a PEFT adapter, MLX or GGUF")
    export.add_argument(
        "--to",
        required=True,
        help="a registered export format (`hwft plugins` lists them): hf: merged safetensors + "
        "tokenizer; peft: the adapter; mlx: an mlx-lm folder; gguf: one file for llama.cpp/Ollama "
        "(the families `hwft env --families` marks)",
    )
    export.add_argument("--out", help="where to write (default: RUN/export/FORMAT, RUN/export/model-TYPE.gguf)")
    export.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="merged weights' dtype (hf, mlx; auto: as loaded, fp32 for the embedded model)",
    )
    add_exporter_flags(export)
    export.add_argument("--overwrite", action="store_true", help="replace an existing export")
    export.add_argument(
        "--verify",
        action="store_true",
        help="reload the export and compare its logits with "
        "the trained model's (prints a JSON line; exit 1 beyond tolerance)",
    )

    board = sub.add_parser(
        "board",
        help="a local web UI: build recipes this machine can run, run and watch them, "
        "compare runs and machines, chat with a result",
    )
    board.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; any other "
        "needs an access token: --token, or one made and printed at start)",
    )
    board.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 picks a free one)")
    board.add_argument(
        "--workspace",
        default=".",
        help="the folder the board may read and write; every path stays inside it (default: the current folder)",
    )
    board.add_argument(
        "--runs", default="runs", help="where run folders are listed from, inside the workspace (default runs)"
    )
    board.add_argument(
        "--token",
        help="access token every request must carry (default: none on 127.0.0.1; made "
        "and printed for any other address); also read from HWFT_BOARD_TOKEN",
    )
    board.add_argument("--max-upload-mb", type=int, default=64, help="largest file the page may upload (default 64)")
    board.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

    plugins = sub.add_parser(
        "plugins",
        help="loaded plugins and the hooks they implement; `plugins check NAME` "
        "runs the conformance suite against backend NAME",
    )
    plugins.add_argument("action", nargs="?", choices=("check",), help="check: run hwft.testing.conformance")
    plugins.add_argument("backend", nargs="?", help="the backend to check (default: every available one)")
    plugins.add_argument("--json", action="store_true", help=f"machine-readable ({PLUGINS_SCHEMA})")
    plugins.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    return parser


def cmd_train(args) -> int:
    from hwft import accelerate_config
    from hwft.distributed import Launch, world_from_env
    from hwft.recipe import load_recipe
    from hwft.train import launch_run, plan_run, run

    if args.resume and "=" in args.resume and not os.path.exists(args.resume):
        args.overrides, args.resume = [*args.overrides, args.resume], "latest"  # `--resume key=value`
    recipe = load_recipe(args.recipe, args.overrides)
    if getattr(args, "own_process", False):
        leave_out_unneeded_imports(recipe)
    if recipe._imported is not None and not args.quiet and world_from_env().main:
        print(f"hwft: {recipe._imported.summary()}", file=sys.stderr)
    recipe, described = accelerate_config.apply(recipe)
    # The command line first, then an accelerate config's processes (not inside a launched rank).
    base = described if described and world_from_env().size == 1 else Launch()
    launch = Launch(
        args.nproc or base.nproc,
        args.nnodes or base.nnodes,
        base.node_rank if args.node_rank is None else args.node_rank,
        args.master_addr or base.master_addr,
        args.master_port or base.master_port,
    )
    if launch.world_size > 1:
        worker = [
            "train",
            args.recipe,
            *args.overrides,
            *(["--quiet"] if args.quiet else []),
            *(["--debug"] if getattr(args, "debug", False) else []),
            *([f"--resume={args.resume}"] if args.resume else []),
        ]
        return launch_run(recipe, launch, worker, dry_run=args.dry_run, resume=args.resume)
    plan = plan_run(recipe, resume=args.resume)
    if args.dry_run:
        resuming = f"; resumes {plan.resume.path} at step {plan.resume.step}" if plan.resume else ""
        print(f"ok: {plan.describe()}{resuming}")
        return 0
    job = run(plan, quiet=args.quiet, recipe_hint=args.recipe)
    if not args.quiet and job.world.main:
        print(f"done: results in {job.run_dir.path}")
    return 0


def cmd_import(args) -> int:
    """The hwft recipe of a LLaMA-Factory YAML on stdout (validated first), its notes as comments."""
    from pathlib import Path

    import yaml

    from hwft import llamafactory
    from hwft.errors import RecipeError
    from hwft.recipe import load_recipe
    from hwft.textfile import read_text

    path = Path(args.recipe)
    load_recipe(path)  # the same checks as hwft train: the translation must validate
    raw = yaml.safe_load(read_text(path, RecipeError))
    if not (isinstance(raw, dict) and llamafactory.looks_like(raw)):
        raise RecipeError(
            f"{path} is not a LLaMA-Factory training recipe (no stage or model_name_or_path); "
            "hwft train reads it as it is"
        )
    print(llamafactory.translate(raw, path).to_yaml(), end="")
    return 0


def cmd_plan(args) -> int:
    """hwft plan: the recipe checked as hwft train checks it, its model measured by the chosen
    backend's engine without its weights (hwft.plan)."""
    import importlib

    from hwft import plan as memory
    from hwft.errors import UserError
    from hwft.recipe import load_recipe
    from hwft.train import plan_run

    recipe = load_recipe(args.recipe, args.overrides)
    planned = plan_run(recipe)
    backend = planned.choice.backend
    tools = importlib.import_module(backend.bench) if backend.bench else None
    if tools is None or not hasattr(tools, "memory_shape"):
        raise UserError(
            f"hwft plan: backend {backend.name} ({backend.engine} engine) has no memory model; "
            "the torch backends (cpu, cuda, rocm, npu) have one"
        )
    devices = memory.Devices.parse(args.devices) if args.devices else tools.memory_devices(backend.name)
    if devices is None:
        raise UserError(
            f"hwft plan: cannot tell the memory of this machine's {backend.name} devices; "
            "give --devices COUNTxSIZE, e.g. 8x80GB"
        )
    shape = tools.memory_shape(recipe, planned.model, backend.name)

    def refused(settings: dict) -> str | None:
        from hwft.select import capability_problems, core_problems

        variant = recipe.model_copy(deep=True)
        variant.parallel = variant.parallel.model_copy(
            update={"offload_params": False, "offload_optimizer": False, **settings}
        )
        problems = core_problems(variant) + [
            p for p in capability_problems(variant, planned.choice.capability) if p.startswith("parallel.")
        ]
        return "; ".join(problems) or None

    text, data = memory.report(
        planned.model.name, shape, devices, recipe.train.optimizer, recipe.method.tuning, refused
    )
    print(json.dumps(data, indent=2) if args.json else text)
    return 0


def cmd_data(args) -> int:
    from hwft.data.inspect import inspect
    from hwft.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    text, report = inspect(recipe, rows=args.rows, color=sys.stdout.isatty() and not args.json)
    print(json.dumps(report, indent=2) if args.json else text)
    return 0


def cmd_env(args) -> int:
    if args.families:
        from hwft.families import who_runs_what
        from hwft.plugins import get_host

        print(who_runs_what(get_host().families()), end="")
        return 0
    report = env_report()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"hwft {report['hwft_version']} (plugin API {report['plugin_api']})")
    print(f"backend: auto -> {report['auto'] or 'none available'}   ranking: {', '.join(report['ranking'])}")
    for b in report["backends"]:
        state = "available" if b["available"] else f"unavailable: {b['reason']}"
        print(f"\n{b['name']}  [{b['engine']} engine, plugin {b['plugin']}, priority {b['priority']}]  {state}")
        print(f"  {b['description']}")
        for d in b["devices"]:
            print("  device: " + ", ".join(f"{k}={v}" for k, v in d.items()))
        cap = b["capability"]
        rows = [
            ("methods", "; ".join(f"{o}: {', '.join(t)}" for o, t in cap["methods"].items())),
            ("dtypes", ", ".join(cap["dtypes"])),
            ("quantization", ", ".join(cap["quantization"]) or "-"),
            ("attention", ", ".join(cap["attention"])),
            ("fused kernels", ", ".join(b["kernels"]) or "-"),
            ("optimizers", ", ".join(cap["optimizers"])),
            ("compile", "yes" if cap["compile"] else "no"),
            ("collective", cap["collective"] or "-"),
            ("parallel", ", ".join(cap["parallel"])),
            ("packing", "yes" if cap["packing"] else "no"),
            *((f"no {what}", why) for what, why in cap["notes"].items()),
        ]
        rows += list(b["details"].items())
        width = max(14, *(len(key) + 2 for key, _ in rows))  # "no fused_rms_norm" is wider than most
        for key, value in rows:
            print(f"  {key:<{width}}{value}")
    for name, dist in report["not_installed"].items():
        print(f"\n{name}  not installed: comes with {dist}")
    return 0


def cmd_bench(args) -> int:
    if args.recipe == "report":
        from hwft.bench.report import report

        return report(args.overrides, args.out, args.force)
    if args.recipe == "schema":
        from hwft.bench.schema import BenchResult

        print(json.dumps(BenchResult.model_json_schema(by_alias=True), indent=1))
        return 0
    from hwft.bench.runner import bench

    backends = [b.strip() for b in args.backends.split(",") if b.strip()] if args.backends else None
    return bench(
        args.recipe,
        args.overrides,
        backends,
        args.steps,
        args.warmup,
        args.baseline,
        args.baseline_bf16,
        args.out or "bench-results",
        args.eval_examples,
        args.repeat,
    )


def cmd_chat(args) -> int:
    from hwft.use.chat import chat

    return chat(args)


def cmd_serve(args) -> int:
    from hwft.ports import check_bind
    from hwft.use.chat import loaded
    from hwft.use.serve import serve

    if args.port:  # before the model loads (port 0: the system picks a free one)
        check_bind(args.host, args.port, "hwft serve")
    return serve(loaded(args), args.host, args.port, args.model_name, args.images_from)


def cmd_eval(args) -> int:
    from hwft.use.evaluate import run

    return run(args)


def cmd_export(args) -> int:
    from hwft.use.export import run

    return run(args)


def cmd_board(args) -> int:
    from hwft.errors import UserError
    from hwft.ports import check_bind

    try:
        from hwft.board.app import serve
    except ImportError as exc:
        raise UserError(
            f"hwft board needs starlette and uvicorn ({exc.name} is missing): pip install 'hwft[board]'"
        ) from None
    if args.port:
        check_bind(args.host, args.port, "hwft board")
    return serve(
        args.workspace,
        args.runs,
        args.host,
        args.port,
        args.token or os.environ.get("HWFT_BOARD_TOKEN"),
        args.max_upload_mb,
    )


def cmd_plugins(args) -> int:
    from hwft.plugins import get_host

    if args.action == "check":
        return check_plugin(args.backend)

    host = get_host()
    if args.json:
        payload = {
            "schema": PLUGINS_SCHEMA,
            "plugin_api": HWFT_PLUGIN_API,
            "plugins": [p.to_json() for p in host.plugins],
            "methods": host.methods().to_json(),
            "data_kinds": host.data_kinds().to_json(),
            "data_formats": [
                {"name": f.name, "kind": f.kind, "description": f.description} for f in host.data_formats().values()
            ],
            "exporters": [{"format": f, "engines": sorted(e)} for f, e in sorted(host.exporters().by_format.items())],
            "kernels": host.kernels().to_json(),
            "families": host.families().to_json(),
        }
        print(json.dumps(payload, indent=2))
        return 0
    for p in host.plugins:
        dist = f"{p.distribution} {p.version}" if p.distribution else "(no distribution)"
        print(f"{p.name:<16}{p.status:<10}{dist:<24}{p.module}")
        if p.hooks:
            print(f"{'':<16}hooks: {', '.join(p.hooks)}")
        if p.error:
            print(f"{'':<16}{p.error}")
    print("\nexport formats (hwft export --to):")
    for name, engines in sorted(host.exporters().by_format.items()):
        first = next(iter(engines.values()))
        print(f"  {name:<14}{', '.join(sorted(engines)):<16}{first.description}")
    print("\nmethods (method.objective):")
    for m in host.methods().to_json():
        engines = ", ".join(m["engines"]) or "no engine"
        print(f"  {m['name']:<14}{m['kind']:<12}{engines:<16}{m['description']} [{m['plugin']}]")
    print("\ndata kinds (what a format makes and a method trains on) and the formats that make each:")
    formats = host.data_formats().values()
    for k in host.data_kinds().to_json():
        made = ", ".join(f.name for f in formats if f.kind == k["name"]) or "no format"
        print(f"  {k['name']:<14}{made:<34}{k['description']} [{k['plugin']}]")
    print("\nkernels (kernels.use; * = auto, where installed):")
    for k in host.kernels().to_json():
        where = f"{k['engine']}: {', '.join(k['backends']) or 'any'}"
        mark = "*" if k["recommended"] else " "
        missing = "" if k["installed"] else " (not installed)"
        print(f"  {mark}{k['id']:<34}{k['slot']:<15}{where:<18}{k['description']}{missing}")
    print("\nmodel families (model_type: fast paths, GGUF):")
    for engine in sorted({f["engine"] for f in host.families().to_json()}):
        rows = [f for f in host.families().to_json() if f["engine"] == engine]
        print(
            f"  {engine}: "
            + "; ".join(
                f"{f['model_type']} ({', '.join(f['paths']) or 'none'}{', gguf ' + f['gguf'] if f['gguf'] else ''})"
                for f in rows
            )
        )
    return 0


def check_plugin(backend: str | None) -> int:
    """``hwft plugins check NAME``: the conformance suite, through pytest (the test extra)."""
    import importlib.util

    from hwft.processes import run_child

    if importlib.util.find_spec("pytest") is None:
        raise UserError("hwft plugins check runs the conformance suite with pytest: pip install pytest")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--pyargs", "hwft.testing.conformance"]
    if backend:
        command += ["--hwft-backend", backend]
    print("hwft: " + " ".join(command[2:]), file=sys.stderr, flush=True)
    return run_child(command, "hwft plugins check")


def main(argv: list[str] | None = None) -> int:
    from hwft.distributed import report_exit

    start_process()
    try:
        code = run_command(argv)
    except BrokenPipeError:  # `hwft env | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 128 + 13  # as a shell reports SIGPIPE
    report_exit(code)  # for a launcher that asked its ranks how they ended
    return code


def run_command(argv: list[str] | None = None) -> int:
    # Never reach a model hub: models and tokenizers come from local folders only.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    parser = _parser()
    # Overrides may follow options too (`hwft train r.yaml --quiet train.lr=1e-4`), which
    # argparse alone does not allow for a positional list.
    args, extra = parser.parse_known_args(argv)
    report = getattr(args, "recipe", None) == "report"
    stray = [x for x in extra if x.startswith("-") or ("=" not in x and not report) or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    args.own_process = argv is None  # the process's own command line, not a caller's (tests, bench)
    commands = {
        "train": cmd_train,
        "import": cmd_import,
        "plan": cmd_plan,
        "data": cmd_data,
        "env": cmd_env,
        "plugins": cmd_plugins,
        "bench": cmd_bench,
        "board": cmd_board,
        "chat": cmd_chat,
        "serve": cmd_serve,
        "eval": cmd_eval,
        "export": cmd_export,
    }
    return guarded(lambda: commands[args.command](args), getattr(args, "debug", False))


if __name__ == "__main__":
    sys.exit(main())
