"""``hwft train``: validate everything cheap first, then hand the job to the chosen backend.

Order matters, cheapest first: recipe -> settings nobody implements -> data rows -> model
resolution -> backend probes (which may import an engine). Each step can refuse with a
UserError before any weight is loaded, and before the output folder is touched.
"""

from __future__ import annotations

from dataclasses import dataclass

from hwft.data.loading import TrainData, load_train_data
from hwft.errors import UserError
from hwft.job import Job
from hwft.models import ResolvedModel, resolve_model
from hwft.output import RunDir
from hwft.plugins import PluginHost, get_host
from hwft.recipe import Recipe
from hwft.rewards import check_rewards
from hwft.select import Choice, preflight, select_backend


@dataclass
class Plan:
    recipe: Recipe
    choice: Choice
    model: ResolvedModel
    data: TrainData

    def describe(self) -> str:
        m = self.recipe.method
        kind = "" if self.model.ready or self.model.kind != "embedded" else " (converted on first use)"
        return (
            f"backend {self.choice.backend.name} ({self.choice.backend.engine} engine), "
            f"{m.objective}/{m.tuning}, model {self.model.name} -> {self.model.path}{kind}, "
            f"{self.data.describe()}"
        )


def plan_run(recipe: Recipe, host: PluginHost | None = None) -> Plan:
    """Everything that can be checked without loading weights; raises UserError."""
    host = host or get_host()
    preflight(recipe, host)
    if recipe.method.objective == "grpo":
        check_rewards(recipe.method.grpo.rewards, host.rewards())
    data = load_train_data(recipe, host.data_formats())
    model = resolve_model(recipe.model.name, recipe.resolve_path("."), recipe.model.revision)
    choice = select_backend(recipe, host)
    return Plan(recipe, choice, model, data)


def run(plan: Plan, quiet: bool = False) -> Job:
    """Create the output folder and let the backend train."""
    recipe = plan.recipe
    if plan.model.kind == "local":  # the saved recipe names the folder the resolver found
        recipe = recipe.model_copy(deep=True)
        recipe.model.name = str(plan.model.path)
    job = Job(plan.recipe, plan.choice, plan.model, plan.data, RunDir(recipe), quiet)
    job.log(f"hwft: {plan.describe()}")
    try:
        plan.choice.backend.train(job)
    except UserError:
        # Refused inside the backend (a model without a chat template, say): leave no
        # half-made folder behind to block the corrected run. Nothing trained is ever removed.
        job.run_dir.discard_if_untrained()
        raise
    return job
