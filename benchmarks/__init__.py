"""fastlora's benchmarks: ``python -m benchmarks layer|train|report|all ...`` from the repo root.

One harness (``harness.py``) times, measures memory and writes JSONL records; ``bench_layer.py``
compares one LoRA projection across providers, ``bench_train.py`` trains Llama-shaped QLoRA models
patched and unpatched, ``report.py`` turns records into ``results.md`` and PNG plots.
"""
