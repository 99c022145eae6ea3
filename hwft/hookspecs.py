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
    """Register row formats: ``register(name, parse, detect=None, description="", kind=None)``.

    ``parse(row, mapping)`` returns an ``hwft.data.formats.Example`` (or a plain list of
    ``{role, content}`` messages, taken as a conversation) and raises ``ValueError`` naming the
    field; ``detect(row, mapping)`` says whether a row looks like this format; ``kind`` is the
    Example kind it makes (chat, text, preference, prompt). See hwft.data.formats.
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
