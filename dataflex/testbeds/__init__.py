"""Test beds: tiny models built from a config and small real datasets, for tests, the demo and benchmarks.

Not part of the library proper: nothing in the core, the samplers, the proxies or the HF adapter
imports this package (``tests/test_configs_and_layers.py`` checks it). It may use the core, the
samplers and the proxies.

* :mod:`~dataflex.testbeds.tiny` — byte-level text data (the bundled textmix and instruction sets),
  its collator, and tiny GPT-2 / Llama / LLaVA models from config with a fixed seed.
* :mod:`~dataflex.testbeds.digits` — a digits visual-question-answering set with a known noise mask.
* :mod:`~dataflex.testbeds.vlm_runs` — what the VLM recipe and benchmark measure on it (noise share, holdout model).
"""
