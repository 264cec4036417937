"""Run state (run_state.py): how many adapters each method holds per task."""

from ril_fast.run_state import adapters_for_task
from tests.tiny_models import rid_config


def test_adapters_per_method(tiny_model_dirs):
    for name, expect in (("baseline", [1, 1, 1]), ("distill", [1, 1, 1]), ("group", [1, 2, 3]), ("rid", [1, 2, 3])):
        cfg = rid_config(tiny_model_dirs["sd"], name=name)
        assert [adapters_for_task(cfg, t) for t in range(3)] == expect, name
