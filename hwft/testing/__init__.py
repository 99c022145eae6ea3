"""Testing hwft and the device plugins written for it.

- :mod:`hwft.testing.conformance`: the conformance suite a device plugin runs against its own
  backend: ``pytest --pyargs hwft.testing.conformance --hwft-backend NAME``, or
  ``hwft plugins check NAME``. hwft's built-in backends pass the same suite in its CI.
- :mod:`hwft.testing.tiny`: 2-layer models of every family hwft's tables name (``tiny_families()``:
  Llama, Qwen2/3, Qwen3-MoE, Mistral, Mixtral, Gemma 2/3, Phi-3, OLMo 2, Granite, GLM-4,
  SmolLM3, DeepSeek-V3), random weights, built in the test (nothing downloaded).
- :mod:`hwft.testing.cells`: a small recipe and data for each objective x tuning cell, each
  chosen so that four steps lower the loss.
- :mod:`hwft.testing.pytest_plugin`: the pytest plugin (entry point ``pytest11``) that adds
  ``--hwft-backend`` and the fixtures the suite uses.
"""
