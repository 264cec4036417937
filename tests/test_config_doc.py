"""docs/config.md is generated from ril_fast/config.py: stale, incomplete or wrong, it fails here."""

from __future__ import annotations

import dataclasses
import json
import re

from ril_fast import config_doc
from ril_fast.config import Config, TaskConfig


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_doc_is_current():
    """Regenerate with `python -m ril_fast.config_doc > docs/config.md` when this fails."""
    assert config_doc.DOC.read_text(encoding="utf-8") == config_doc.render()
    assert config_doc.main(["--check"]) == 0


def test_every_key_has_its_default_and_a_reason():
    """Independent of the generator: the keys and defaults of Config() and TaskConfig() as to_dict gives them."""
    rows = {}
    for line in config_doc.DOC.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\| `([^`]+)` \| (.*?) \| `(.*?)` \| (.*) \|$", line)
        if m:
            rows[m.group(1)] = (m.group(3).replace("\\|", "|"), m.group(4))
    want = {k: v for k, v in _flatten(Config().to_dict()).items() if k != "tasks"}
    want.update({f"tasks.N.{k}": v for k, v in _flatten(dataclasses.asdict(TaskConfig())).items()})
    assert set(rows) == set(want)
    for key, value in want.items():
        assert json.loads(rows[key][0]) == value, key
        assert len(rows[key][1]) > 5, f"{key}: no reason given"
    assert config_doc.undocumented() == []


def test_comments_above_and_on_the_line_are_both_read():
    why = config_doc.field_comments()
    assert why[("TrainConfig", "cpu_threads")].startswith("torch CPU threads (None = torch's default).")
    assert why[("TrainConfig", "cpu_threads")].endswith("went from 35 ms to 4 s.")
    assert why[("TrainConfig", "grad_clip")] == "0 disables clipping"
