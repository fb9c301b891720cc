"""The control plane on the user's machine: CLI, plan, apply, state, pricing, reports.

Nothing here imports torch, transformers, sky or boto3 at module level.
"""
