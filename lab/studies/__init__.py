"""Studies: measurements that read the engine and are never read by it.

One study per module: ``batch_sweep`` (where speculation stops paying as the
batch grows) with ``auto_k`` (its cost model by batch size and the policy that
picks K), ``compare`` (drafters x K on prompt sets), ``peer`` (the lab against
transformers' own assisted generation), ``precision`` (quantised models),
``constrained`` (grammar-constrained decoding), ``engine_modes`` (eager, static
and compiled engines side by side), ``serve_bench`` (OpenAI-compatible servers
under concurrency) with ``serve_reference`` (the lab's engine on the same
prompts), ``calibrate`` (host-adaptive precision and K), ``costs`` (c(B) and
v(K, B) by batch size), ``token_frequencies`` and ``train_head``.

``passes`` holds what they share: the one pass timer and the one cost
vocabulary, c and v(K).
"""
