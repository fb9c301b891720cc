"""The prepared GPU check (``python -m benchmarks.gpu_check``): one module per group of checks.

``harness`` runs each check in its own try block and records it; ``bench`` holds what the checks
share (sizes, device, corpus, tokenizer, contexts); ``training``, ``memory``, ``quantized`` and
``distributed`` are the checks, each calling optjob's own code paths (steps/)."""
