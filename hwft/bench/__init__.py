"""``hwft bench``: the same workload timed on every backend, comparable across machines.

    hwft bench RECIPE [--backends cpu,mlx] [--steps N --warmup W] [--baseline hf[,hf-liger]] [--out DIR]
    hwft bench report DIR/*.json [--out DIR] [--force]

:mod:`~hwft.bench.runner` plans the workload (cheap checks first, no engine imported), then
runs each arm in its own process (so peak memory is that arm's alone): the recipe on each
backend (:mod:`~hwft.bench.worker`), and with ``--baseline hf`` the tutorial transformers
``Trainer`` + peft path on the very sequences the hwft arm trained on (``hf-liger``: the same with
Liger's kernels), with the settings the recipe's ``bench.baseline`` fixes. Each arm writes one
JSON result (:mod:`~hwft.bench.schema`, ``hwft.bench/1``) with a hardware fingerprint
(:mod:`~hwft.bench.fingerprint`) and MFU from a stated FLOP model (:mod:`~hwft.bench.flops`);
:mod:`~hwft.bench.report` merges results from any machines into a table and charts.

A backend takes part by naming its engine's bench tools on its record (``Backend.bench``, plugin
API 1.1: ``model_dims``, ``peak_flops``, ``held_out_loss``, ``memory_kind``; the torch engine's,
:mod:`hwft_torch.bench`, also runs the Trainer baseline).
"""
