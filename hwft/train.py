"""``hwft train``: validate everything cheap first, then hand the job to the chosen backend.

Order matters, cheapest first: recipe -> settings nobody implements -> data rows -> model
resolution -> backend probes (which may import an engine). Each step can refuse with a
UserError before any weight is loaded, and before the output folder is touched.
"""

from __future__ import annotations

from dataclasses import dataclass

from hwft import accelerate_config
from hwft.checkpoint import Checkpoint
from hwft.data.loading import TrainData, load_train_data
from hwft.distributed import Launch, world_from_env
from hwft.errors import RecipeError, SelectionError, UserError
from hwft.job import Job
from hwft.models import ResolvedModel, check_adapter, check_remote_code, materialise, resolve_model, with_random_weights
from hwft.output import RunDir, check_output_dir
from hwft.plugins import PluginHost, get_host
from hwft.processes import children_stop_with_this_process
from hwft.recipe import Recipe
from hwft.resume import open_checkpoint
from hwft.select import Choice, preflight, select_backend
from hwft.tracking import check_loggers
from hwft.vision import check_media


@dataclass
class Plan:
    recipe: Recipe
    choice: Choice
    model: ResolvedModel
    data: TrainData
    resume: Checkpoint | None = None

    def describe(self) -> str:
        m = self.recipe.method
        kind = "" if self.model.ready or self.model.kind != "embedded" else " (converted on first use)"
        return (
            f"backend {self.choice.backend.name} ({self.choice.backend.engine} engine), "
            f"{m.objective}/{m.tuning}, model {self.model.name} -> {self.model.path}{kind}, "
            f"{self.data.describe()}"
        )


def plan_run(
    recipe: Recipe, host: PluginHost | None = None, ranks: int | None = None, resume: str | None = None
) -> Plan:
    """Everything that can be checked without loading weights; raises UserError. ``ranks``: the
    processes the run will have (default: this process's launcher environment); with several,
    ``parallel.strategy: none`` means ddp. ``resume``: ``latest`` or a checkpoint folder, found,
    verified against its manifest and compared with the recipe here."""
    host = host or get_host()
    recipe, _ = accelerate_config.apply(recipe)
    ranks = ranks or world_from_env().size
    if ranks > 1 and recipe.parallel.strategy == "none":
        recipe = recipe.model_copy(deep=True)
        recipe.parallel.strategy = "ddp"
    preflight(recipe, host)
    chosen = host.methods().get(recipe.method.objective)
    if chosen.check is not None:
        chosen.check(recipe, host)
    check_loggers(recipe.output.report_to, host.loggers())
    data = load_train_data(recipe, host.data_formats())
    model = resolve_model(recipe.model.name, recipe.resolve_path("."), recipe.model.revision)
    if model.kind == "local":
        # The run names the folder the resolver found: the copies of the recipe in the run's folder
        # and in each checkpoint, and the recipe a resume is compared with, wherever it is read from.
        recipe = recipe.model_copy(deep=True)
        recipe.model.name = str(model.path)
    if recipe.model.shape:
        if recipe.method.tuning == "qlora":
            raise RecipeError(
                "model.shape builds random weights; method.tuning qlora quantises the weights it loads, "
                "and a shape has none to load: use lora, or a real model folder for qlora"
            )
        model = with_random_weights(model, recipe.resolve_path(recipe.model.shape))
    if model.ready:
        check_remote_code(model.path, recipe.model.trust_remote_code)
    if recipe.model.adapter:
        check_adapter(recipe.resolve_path(recipe.model.adapter))
    choice = select_backend(recipe, host)
    check_media(
        [*data.examples, *data.eval_examples], model, choice.capability, choice.backend.name, recipe.method.objective
    )
    checkpoint = open_checkpoint(recipe, resume, ranks) if resume else None
    if checkpoint and checkpoint.state["engine"] != choice.backend.engine:
        raise UserError(
            f"--resume: {checkpoint.path} was written by the {checkpoint.state['engine']} engine; backend "
            f"{choice.backend.name} runs the {choice.backend.engine} engine. Resume on a backend of the same engine"
        )
    return Plan(recipe, choice, model, data, checkpoint)


def run(plan: Plan, quiet: bool = False, recipe_hint: str = "RECIPE.yaml") -> Job:
    """Create the output folder and let the backend train."""
    recipe = plan.recipe
    world = world_from_env()
    resume_step = plan.resume.step if plan.resume else None
    run_dir = RunDir(recipe, writes=world.main, resume_step=resume_step, recipe_hint=recipe_hint)
    job = Job(
        plan.recipe,
        plan.choice,
        plan.model,
        plan.data,
        run_dir,
        quiet,
        world=world,
        resume=plan.resume,
        recipe_hint=recipe_hint,
    )
    job.log(f"hwft: {plan.describe()}")
    if recipe.model.trust_remote_code:
        job.log(
            f"warning: model.trust_remote_code is on: Python code shipped with {plan.model.path} runs in "
            "this process. Turn it off unless you trust that folder's author"
        )
    if world.main and recipe.output.report_to:
        run_dir.start_tracking(recipe.output.report_to, get_host().loggers(), recipe)
    try:
        with run_dir.writing("the run's files"):  # what no write site named more precisely
            plan.choice.backend.train(job)  # the engine fills job.results
    except UserError:
        # Refused inside the backend (a model without a chat template, say): leave no
        # half-made folder behind to block the corrected run. Nothing trained is ever removed.
        job.run_dir.discard_if_untrained()
        raise
    finally:
        run_dir.stop_tracking()
    return job


def launch_run(
    recipe: Recipe, launch: Launch, worker_argv: list[str], dry_run: bool = False, resume: str | None = None
) -> int:
    """``hwft train --nproc N``: check everything once, here, then let the backend's launch hook
    start the processes, each running ``hwft *worker_argv`` (which finds its rank in the
    launcher's environment). Returns the exit code."""
    launch.check()
    world = world_from_env()
    if world.size > 1:
        raise UserError(
            f"this process is already rank {world.rank} of {world.size} (started by {world.launcher}); "
            "drop --nproc/--nnodes, the launcher started the processes"
        )
    from hwft.select import ranks_problem

    if problem := ranks_problem(recipe, launch.world_size):
        raise RecipeError(problem)
    plan = plan_run(recipe, ranks=launch.world_size, resume=resume)
    backend = plan.choice.backend
    if backend.launch is None:
        raise SelectionError(
            f"backend {backend.name} runs one process only (it has no launch hook); drop --nproc, "
            "or choose a backend that launches several"
        )
    if dry_run:
        print(
            f"ok: {plan.describe()}; {launch.world_size} processes ({launch.nproc} per node), "
            f"parallel.strategy {plan.recipe.parallel.strategy}"
        )
        return 0
    if launch.node_rank == 0 and not plan.resume:  # rank 0 lives on node 0 and writes the output folder
        check_output_dir(plan.recipe)
    materialise(plan.model)  # convert an embedded model once, before the ranks read it
    with children_stop_with_this_process():  # hwft.processes: even if this process is killed
        return backend.launch(launch, worker_argv)
