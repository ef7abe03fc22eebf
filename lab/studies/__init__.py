"""Studies: measurements that read the engine and are never read by it.

One study per module: ``batch_sweep`` (where speculation stops paying as the
batch grows, with ``auto_k``'s policy), ``compare`` (drafters x K on prompt
sets), ``peer`` (the lab against transformers' own assisted generation),
``precision`` (quantised models), ``constrained`` (grammar-constrained decoding),
``engine_modes`` (eager, static and compiled engines side by side),
``serve_bench`` (OpenAI-compatible servers under concurrency), ``calibrate``
(host-adaptive precision and K), ``costs`` (the one pass timer and the cost
vocabulary c and v(K)), ``token_frequencies`` and ``train_head``.
"""
