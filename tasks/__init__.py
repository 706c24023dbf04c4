"""Pipeline stages: one file per stage, each a pure function over paths + typed params, and a thin `main()`.

No Prefect here: orchestration lives in `flows/` and `dvc.yaml`.
"""
