"""Orchestration: Prefect flows over the DVC pipeline in dvc.yaml (one task per stage, DVC decides what runs).

`pipeline` (flows/pipeline.py), `refresh` (flows/refresh.py), the GPU hand-off (flows/handoff.py) and the
deployments (flows/serve.py); docs/pipeline.md explains how they fit together.
"""
