"""The hooks a plugin may implement. Built-ins use exactly these, through the same entry points.

Every hook takes a ``register`` callback (the simonw/llm style), so a hook's body is a few
``register(...)`` calls and new keyword arguments can be added without breaking plugins.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("hwft")


@hookspec
def hwft_register_backends(register):
    """Register device backends: ``register(hwft.records.Backend(...))``."""


@hookspec
def hwft_register_data_formats(register):
    """Register row formats: ``register(hwft.data.formats.DataFormat(name, kind, parse, detect=None,
    description=""))``.

    ``kind`` is the kind of example it makes (hwft.data.kinds); ``parse(row, mapping)`` returns
    an example of that kind (a chat format may return a plain list of ``{role, content}``
    messages) and raises ``ValueError`` naming the field; ``detect(row, mapping)`` says whether a
    row looks like this format. Since plugin API 2.0 a record (0.1-1.1: positional arguments).
    """


@hookspec
def hwft_register_data_kinds(register):
    """Register kinds of example: ``register(hwft.data.kinds.DataKind(name, description, example,
    batches, encode=None, inspect=None))``: its typed example class, how an example renders to
    token sequences (where it is one), and the batcher that turns a run's examples into
    micro-batches. A format says which kind it makes; a method which kind it trains on. Since
    plugin API 2.0.
    """


@hookspec
def hwft_register_rewards(register):
    """Register GRPO reward functions: ``register(name, function, description="")``.

    ``function(samples, **args)`` takes a list of ``hwft.rewards.Sample`` (prompt, completion,
    reference, completion_tokens, truncated) and returns one float per sample; ``args`` come
    from the recipe (``method.grpo.rewards: [{name, weight, args}]``). Since plugin API 0.2.
    """


@hookspec
def hwft_register_loggers(register):
    """Register experiment trackers: ``register(hwft.tracking.Logger(name, open, requires, description))``.

    ``open(run_dir, recipe)`` returns an object with ``log(step, {key: float})`` and ``close()``;
    a recipe names trackers in ``output.report_to``. Since plugin API 0.4.
    """


@hookspec
def hwft_register_methods(register):
    """Register training methods: ``register(hwft.methods.Method(...))``.

    A method is what ``method.objective`` names: its ``method.<name>`` section, the kind of
    example it trains on, whether its rows pack, how examples become micro-batches, its metrics
    and its conformance invariants (see hwft.methods.record). Since plugin API 1.1.
    """


@hookspec
def hwft_register_method_implementations(register):
    """Register an engine's implementation of a method: ``register(hwft.methods.Implementation(
    method, engine, build, tunings))``; ``build(setup)`` returns the engine's objective.

    The methods a backend runs are those its capability record claims (or, with
    ``Capability.tunings``, every method its engine implements) that its engine implements.
    Since plugin API 1.1.
    """


@hookspec
def hwft_register_exporters(register):
    """Register export formats: ``register(hwft.use.exporters.Exporter(format, engine, ...))``;
    ``hwft export --to FORMAT`` takes the one on the trained result's engine. Since plugin API 1.1.
    """


@hookspec
def hwft_register_kernels(register):
    """Register fused kernels: ``register(hwft.kernels.Kernel(id, slot, engine, ...))``, each
    naming its class (check, apply, undo; see hwft.kernels) by a "module:Class" path so that
    registering imports no engine. ``kernels.use`` names them by id. Since plugin API 1.1.
    """


@hookspec
def hwft_register_model_families(register):
    """Register what an engine knows of a model family: ``register(hwft.families.Family(
    model_type, engine, paths=..., attention=..., gguf=...))``. Registering a built-in
    family's (engine, model_type) again adds fast paths to it. Since plugin API 1.1.
    """
