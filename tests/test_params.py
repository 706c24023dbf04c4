"""The shipped params.yaml loads into every stage's params model, and dvc.yaml and params.yaml agree."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from flows.params_file import set_params
from flows.pipeline import PARAMS_KEYS, PipelineSettings
from flows.stages import dvc_env, stage_plan
from tasks.common import load_section, read_params

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"
# section -> "module:Model" that reads it
MODELS = {
    "base_model": "tasks.base_model:BaseModelParams",
    "download": "tasks.download:DownloadParams",
    "transcribe": "tasks.transcribe:TranscribeParams",
    "srt_to_jsonl": "tasks.srt_to_jsonl:SrtToJsonlParams",
    "typo_fix": "tasks.typo_fix:TypoFixParams",
    "augment": "tasks.augment:AugmentParams",
    "dedupe": "tasks.dedupe:DedupeParams",
    "train": "rwkv7.train:TrainParams",
    "evaluate": "tasks.evaluate:EvaluateParams",
}
# sections read by the orchestration rather than one stage model
ORCHESTRATION = {"model", "schedule"}


def dvc_stages() -> dict:
    return YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("section", sorted(MODELS))
def test_section_loads_into_its_model(section: str) -> None:
    module, name = MODELS[section].split(":")
    model = getattr(importlib.import_module(module), name)
    loaded = load_section(model, section, PARAMS)
    assert isinstance(loaded, model)
    assert read_params(PARAMS)[section], f"params.yaml has no '{section}' section"


def test_every_section_is_read_by_something() -> None:
    read_by_stages = {p.split(".")[0] for stage in dvc_stages().values() for p in stage.get("params", [])}
    assert set(read_params(PARAMS)) == set(MODELS) | ORCHESTRATION
    assert read_by_stages <= set(read_params(PARAMS))
    assert set(MODELS) <= read_by_stages


def test_every_stage_runs_its_own_module_and_lists_its_code() -> None:
    for name, stage in dvc_stages().items():
        assert stage["cmd"].startswith(f"python -m tasks.{name} --params params.yaml"), name
        assert f"tasks/{name}.py" in stage["deps"], f"{name}: its own code is not a dependency"
        assert name in stage["params"], f"{name}: does not list its params section"
        assert not stage.get("always_changed"), f"{name}: always_changed keeps dvc status dirty"
        for out in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
            options = next(iter(out.values())) if isinstance(out, dict) else {}
            assert options.get("cache", True) and not options.get("persist"), f"{name}: {out} has no run-cache"


def test_refresh_cron_is_five_fields() -> None:
    assert len(read_params(PARAMS)["schedule"]["refresh_cron"].split()) == 5


def test_flow_form_fields_are_real_params_keys(tmp_path: Path) -> None:
    """Every Prefect form field writes a key its stage model accepts (extra keys are rejected there)."""
    values = {"sources": ["samples/media"], "model_path": "models/x.pth", "epochs": 2, "max_steps": 5,
              "augment_provider": "gemini", "augment_target": 10}
    assert set(values) == set(PipelineSettings.model_fields) == set(PARAMS_KEYS)
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS.read_text())
    set_params(params, PipelineSettings(**values).params_updates())
    for section, spec in MODELS.items():
        module, name = spec.split(":")
        load_section(getattr(importlib.import_module(module), name), section, params)
    assert read_params(params)["model"]["path"] == "models/x.pth"


def test_flow_plan_of_the_real_pipeline_equals_dvc_dag() -> None:
    dot = subprocess.run([sys.executable, "-m", "dvc", "dag", "--dot"], cwd=ROOT, env=dvc_env(),
                         capture_output=True, text=True, check=True).stdout
    plan = stage_plan(ROOT)
    assert set(plan.order) == set(re.findall(r'^"([^"]+)";$', dot, re.M)) == set(dvc_stages())
    assert plan.edges() == set(re.findall(r'^"([^"]+)" -> "([^"]+)";$', dot, re.M))
    assert plan.order.index("train") > max(plan.order.index(s) for s in ("dedupe", "base_model"))
