"""params.yaml edits from the flow form keep every comment and touch only the keys that change."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.params_file import ParamsFileError, set_params
from flows.pipeline import PipelineSettings

ORIGINAL = """\
# statetune parameters
download:
  sources:  # where videos come from
    - samples/media
  cookies: null
train:
  epochs: 2  # passes over the data
  lr: 0.01
"""


def test_changed_keys_written_comments_preserved(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(ORIGINAL)
    changed = set_params(path, {"train.epochs": 5, "train.lr": 0.01, "model.path": "models/g1.pth"})
    assert changed == {"train.epochs": (2, 5), "model.path": (None, "models/g1.pth")}
    text = path.read_text()
    assert "  epochs: 5  # passes over the data\n" in text
    assert text.startswith("# statetune parameters\ndownload:\n  sources:  # where videos come from\n")
    assert text.endswith("model:\n  path: models/g1.pth\n")


def test_lists_replaced_and_unchanged_file_not_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(ORIGINAL)
    assert set_params(path, {"download.sources": ["samples/media"]}) == {}
    assert path.read_text() == ORIGINAL
    changed = set_params(path, {"download.sources": ["https://example.org/list", "samples/media"]})
    assert changed == {"download.sources": (["samples/media"], ["https://example.org/list", "samples/media"])}
    assert "    - https://example.org/list\n    - samples/media\n  cookies: null\n" in path.read_text()


def test_non_mapping_parent_is_an_error_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(ORIGINAL)
    with pytest.raises(ParamsFileError, match=r"download\.cookies is not a mapping, cannot set download\.cookies\.x"):
        set_params(path, {"download.cookies.x": 1})
    assert path.read_text() == ORIGINAL


def test_form_settings_map_to_params_keys() -> None:
    settings = PipelineSettings(epochs=3, model_path="models/rwkv7-g1.pth")
    assert settings.params_updates() == {"train.epochs": 3, "model.path": "models/rwkv7-g1.pth"}
    assert PipelineSettings().params_updates() == {}
