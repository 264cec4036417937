"""Crash safety and exact resume: runs SIGKILLed at named points (``RIL_FAST_FAULT``) and restarted
with the same command end bitwise equal to an uninterrupted run (adapters, results, metrics);
corrupt checkpoints are detected and skipped; NaN/Inf losses and gradients are skipped and counted.

Each CLI run is a forked child (see ``reliability_support``); CPU, ``train.deterministic: true``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import reliability_support as rs
import torch
from safetensors.torch import load_file

from ril_fast import checkpoint as ckpt


# every task draws from the global RNG while it trains: the resume tests fail if the RNG state is not restored
REWARDS = ("reliability_support:jittered_brightness",)


@pytest.fixture(scope="module")
def model():
    return rs.tiny_model_dir("sd")


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    """One uninterrupted run of the 2-task config."""
    root = tmp_path_factory.mktemp("ref")
    conf = rs.write_config(rs.make_config(model, root / "run", rewards=REWARDS), root / "cfg.json")
    assert rs.run_forked(["--config", conf], root / "log.txt") == 0, (root / "log.txt").read_text()
    return root / "run"


def _assert_same_run(out: Path, ref: Path) -> None:
    assert rs.adapter_bytes(out) == rs.adapter_bytes(ref)
    assert sorted(rs.adapter_bytes(ref)) == ["task_01", "task_02"]
    assert rs.comparable_results(out) == rs.comparable_results(ref)
    # metrics lines written after the checkpoint a run resumed from are dropped, then written again
    assert rs.comparable_metrics(out) == rs.comparable_metrics(ref)


def test_each_rank_gets_its_own_rng_state_back(tmp_path):
    """Rank 1 stages its state, rank 0 writes the checkpoint; a fresh process of either rank restores its own."""
    torch.manual_seed(11)
    torch.rand(3)
    ckpt.stage_rank_rng(tmp_path, 1, rank=1)
    want = {1: torch.rand(4)}
    torch.manual_seed(22)
    ckpt.save_checkpoint(tmp_path, 1, {"x": torch.zeros(1)}, {})
    want[0] = torch.rand(4)
    for rank in (0, 1):
        torch.manual_seed(99)  # a restarted process starts from the seed, not where the run was
        ckpt.restore_rng(ckpt.load_latest(tmp_path, rank=rank)[3])
        assert torch.equal(torch.rand(4), want[rank]), rank


def test_checkpoint_contents(reference):
    """Task-boundary and mid-task checkpoints hold every adapter, the EMA teacher, optimizer, RNG, results."""
    folders = ckpt.list_checkpoints(reference)
    assert len(folders) == 2  # keep_checkpoints = 2
    meta, state, optim, rng = ckpt.load_latest(reference)
    assert (meta["task"], meta["phase"], meta["step"]) == (1, "done", 2)
    assert len(meta["results"]["reward_matrix"]) == 3  # base row + one per task
    assert any(k.endswith("lora_a.1") for k in state) and any(k.endswith("ema_a") for k in state)
    assert rng is not None and "torch" in rng
    assert set(meta["files"]) >= {"state.safetensors", "rng-rank0.safetensors"}
    assert optim is None  # task-boundary checkpoints need no optimizer state


def test_resume_after_kills_at_every_point(model, reference, tmp_path):
    """Kill, restart with the same command, repeatedly, at each named point; the end is bitwise the reference."""
    conf = rs.write_config(rs.make_config(model, tmp_path / "run", rewards=REWARDS), tmp_path / "cfg.json")
    log = tmp_path / "log.txt"
    out = tmp_path / "run"
    plan = [
        ("eval:1", None),  # row-0 evaluation logged, no checkpoint yet: the restart starts over
        ("step:1", 1),  # task 1 step 1 logged, its checkpoint not written
        ("ckpt_write:2", 1),  # between the state and optimizer files of the step-1 checkpoint
        ("eval:1", 3),  # task 1 trained ("trained" checkpoint), evaluation row 1 logged
        ("task_boundary:1", 4),  # task 1 done and checkpointed, task 2 not begun
        ("step:2", 5),  # task 2 step 2 logged, "trained" checkpoint not written
    ]
    for fault, newest_seq in plan:
        rc = rs.run_forked(["--config", conf], log, fault=fault)
        assert rc == -9, f"{fault}: exit {rc}, expected SIGKILL\n{log.read_text()[-3000:]}"
        names = [f.name for f in ckpt.list_checkpoints(out)]
        assert (names[0] if names else None) == (None if newest_seq is None else f"ckpt-{newest_seq:06d}"), fault
        if fault.startswith("ckpt_write"):  # the half-written checkpoint stays invisible
            assert (out / "checkpoints" / ".tmp-ckpt-000002").is_dir()
            assert not (out / "checkpoints" / "ckpt-000002").exists()
        if fault == "step:1":  # the logged-but-lost step is in metrics.jsonl until the restart drops it
            assert [m["kind"] for m in rs.read_metrics(out)] == ["eval", "train"]
    assert rs.run_forked(["--config", conf], log) == 0, log.read_text()[-3000:]
    assert "resuming from checkpoint 5: task 2 (t1) at step 1 of 2" in log.read_text()
    _assert_same_run(out, reference)
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_corrupt_checkpoint_falls_back(model, reference, tmp_path):
    """A truncated newest checkpoint is detected by checksum, skipped with a warning, and the previous used."""
    conf = rs.write_config(rs.make_config(model, tmp_path / "run", rewards=REWARDS), tmp_path / "cfg.json")
    log = tmp_path / "log.txt"
    out = tmp_path / "run"
    assert rs.run_forked(["--config", conf], log, fault="task_boundary:1") == -9
    newest = ckpt.list_checkpoints(out)[0]
    assert newest.name == "ckpt-000004"
    state = newest / "state.safetensors"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # truncated, as by a full disk
    # the mid-task checkpoint before it holds optimizer state that loads back
    meta, _, optim, _ = ckpt.load_latest(out)
    assert (meta["seq"], meta["phase"]) == (3, "trained") and optim is None
    assert rs.run_forked(["--config", conf], log) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "skipping checkpoint ckpt-000004" in text and "checksum mismatch" in text
    assert "resuming from checkpoint 3: task 1 (t0) trained, not yet evaluated" in text
    _assert_same_run(out, reference)


def test_all_checkpoints_corrupt_is_fatal(model, tmp_path):
    conf = rs.write_config(rs.make_config(model, tmp_path / "run", steps=(1, 1)), tmp_path / "cfg.json")
    log = tmp_path / "log.txt"
    out = tmp_path / "run"
    assert rs.run_forked(["--config", conf], log, fault="step:1") == -9
    for folder in ckpt.list_checkpoints(out):
        meta = folder / "meta.json"
        meta.write_text(meta.read_text()[:-20])
    log.write_text("")
    assert rs.run_forked(["--config", conf], log) == 1
    err = [line for line in log.read_text().splitlines() if line.startswith("ril_fast:")]
    assert len(err) == 1 and "no checkpoint verifies" in err[0], log.read_text()[-2000:]
    assert "Traceback" not in log.read_text()


def test_mid_task_checkpoint_has_optimizer(model, tmp_path):
    conf = rs.write_config(rs.make_config(model, tmp_path / "run", steps=(2,)), tmp_path / "cfg.json")
    assert rs.run_forked(["--config", conf], tmp_path / "log.txt", fault="step:2") == -9
    meta, state, optim, _ = ckpt.load_latest(tmp_path / "run")
    assert (meta["task"], meta["phase"], meta["step"]) == (0, "train", 1)
    assert optim is not None and all("exp_avg" in s for s in optim["state"].values())
    assert len(optim["state"]) == 2 * len([k for k in state if k.endswith("lora_a.0")])  # A and B per layer


def test_nan_steps_skipped_then_recovered(model, tmp_path):
    """A NaN loss and a NaN-only-gradient step are skipped, counted and logged; parameters do not move."""
    cfg = rs.make_config(model, tmp_path / "run", steps=(4,), max_bad_steps=3)
    cfg["tasks"][0]["reward"] = "reliability_support:flaky_brightness"
    conf = rs.write_config(cfg, tmp_path / "cfg.json")
    rc = rs.run_forked(["--config", conf], tmp_path / "log.txt", env={"RIL_TEST_BAD": "loss:2,grad:3"})
    assert rc == 0, (tmp_path / "log.txt").read_text()[-3000:]
    train = [m for m in rs.read_metrics(tmp_path / "run") if m["kind"] == "train"]
    assert [m["skipped"] for m in train] == [False, True, True, False]
    assert [m["bad_in_a_row"] for m in train] == [0, 1, 2, 0]
    assert "reward" not in train[1] and "reward" in train[2]  # loss NaN: no reward; grad NaN: reward finite
    assert "non-finite loss or gradient, step skipped" in (tmp_path / "log.txt").read_text()


def test_too_many_bad_steps_stop_with_checkpoint_intact(model, tmp_path):
    cfg = rs.make_config(model, tmp_path / "run", steps=(5,), max_bad_steps=2)
    cfg["tasks"][0]["reward"] = "reliability_support:flaky_brightness"
    conf = rs.write_config(cfg, tmp_path / "cfg.json")
    log = tmp_path / "log.txt"
    rc = rs.run_forked(["--config", conf], log, env={"RIL_TEST_BAD": "loss:2,grad:3,loss:4"})
    assert rc == 1, log.read_text()[-3000:]
    err = [line for line in log.read_text().splitlines() if line.startswith("ril_fast:")]
    assert len(err) == 1 and "2 non-finite steps in a row" in err[0] and "checkpoint is intact" in err[0]
    assert "Traceback" not in log.read_text()
    # checkpoints after step 1 (good) and step 2 (skipped: same weights) both verify and agree
    folders = ckpt.list_checkpoints(tmp_path / "run")
    metas = [json.loads((f / "meta.json").read_text()) for f in folders]
    assert [(m["phase"], m["step"]) for m in metas] == [("train", 2), ("train", 1)]
    a, b = (load_file(f / "state.safetensors") for f in folders)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    meta, _, optim, _ = ckpt.load_latest(tmp_path / "run")
    assert meta["step"] == 2 and optim is not None
    shutil.rmtree(tmp_path / "run")


def test_disk_full_during_checkpoint_then_resume(model, reference, tmp_path, monkeypatch):
    """ENOSPC in the middle of a checkpoint write: exit 1 with one line, older checkpoints verify, and
    rerunning the same command (space freed) ends equal to the reference."""
    import errno

    conf = rs.write_config(rs.make_config(model, tmp_path / "run", rewards=REWARDS), tmp_path / "cfg.json")
    log = tmp_path / "log.txt"
    real, calls = ckpt.save_tensors_atomic, [0]

    def filling_disk(path, tensors):
        calls[0] += 1
        # 1: eval/base_images, 2: eval/row_images_0, 3-4: checkpoint 1, 5-7: checkpoint 2 (state, optimizer,
        # rng); 8: the first file of checkpoint 3 (task 1 "trained")
        if calls[0] == 8:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, tensors)

    monkeypatch.setattr(ckpt, "save_tensors_atomic", filling_disk)  # inherited by the forked child
    assert rs.run_forked(["--config", conf], log) == 1, log.read_text()[-3000:]
    monkeypatch.undo()
    err = [line for line in log.read_text().splitlines() if line.startswith("ril_fast:")]
    assert len(err) == 1 and "No space left on device" in err[0] and "previous checkpoint is intact" in err[0]
    assert "Traceback" not in log.read_text()
    assert [f.name for f in ckpt.list_checkpoints(tmp_path / "run")] == ["ckpt-000002", "ckpt-000001"]
    assert ckpt.load_latest(tmp_path / "run")[0]["seq"] == 2
    assert rs.run_forked(["--config", conf], log) == 0, log.read_text()[-3000:]
    _assert_same_run(tmp_path / "run", reference)


@pytest.mark.parametrize("target", ["metrics", "results"])
def test_disk_full_writing_metrics_or_results_then_resume(model, reference, tmp_path, monkeypatch, target):
    """ENOSPC while appending metrics.jsonl or writing results.json: exit 1 with one line naming the
    file, no traceback; rerunning the same command (space freed) ends equal to the reference."""
    import errno

    from ril_fast import metrics_log, report

    conf = rs.write_config(rs.make_config(model, tmp_path / "run", rewards=REWARDS), tmp_path / "cfg.json")
    log = tmp_path / "log.txt"
    calls = [0]
    if target == "metrics":
        real = metrics_log.MetricsLog.write

        def filling(self, record, tb_step=None):
            calls[0] += 1
            if calls[0] == 3 and self.enabled:  # a train step's line, mid task 1
                with open(self.path, "a") as f:
                    f.write('{"kind": "train", "ste')  # the torn half of a line, as a full disk leaves it
                raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
            return real(self, record, tb_step)

        monkeypatch.setattr(metrics_log.MetricsLog, "write", filling)
    else:
        real = report.write_json_atomic

        def filling(path, obj):
            if Path(path).name == "results.json":
                calls[0] += 1
                if calls[0] == 1:  # after task 1
                    raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return real(path, obj)

        monkeypatch.setattr(report, "write_json_atomic", filling)
    assert rs.run_forked(["--config", conf], log) == 1, log.read_text()[-3000:]
    monkeypatch.undo()
    text = log.read_text()
    err = [line for line in text.splitlines() if line.startswith("ril_fast:")]
    name = "metrics.jsonl" if target == "metrics" else "results.json"
    assert len(err) == 1 and name in err[0] and "No space left on device" in err[0], err
    assert "Traceback" not in text
    assert rs.run_forked(["--config", conf], log) == 0, log.read_text()[-3000:]
    _assert_same_run(tmp_path / "run", reference)


def test_bad_step_streak_survives_resume(model, tmp_path):
    """A run killed inside a streak of skipped steps stops at the same step as an uninterrupted run would."""
    cfg = rs.make_config(model, tmp_path / "run", steps=(4,), max_bad_steps=2)
    cfg["tasks"][0]["reward"] = "reliability_support:flaky_brightness"
    conf = rs.write_config(cfg, tmp_path / "cfg.json")
    log = tmp_path / "log.txt"
    # step 2 skipped (checkpointed with the streak at 1), killed after step 3 is logged
    assert rs.run_forked(["--config", conf], log, fault="step:3", env={"RIL_TEST_BAD": "loss:2"}) == -9
    meta = ckpt.load_latest(tmp_path / "run")[0]
    assert (meta["step"], meta["bad_in_a_row"]) == (2, 1)
    # the restarted process replays step 3, now non-finite (its first training call): 2 in a row -> stop
    log.write_text("")
    assert rs.run_forked(["--config", conf], log, env={"RIL_TEST_BAD": "loss:1"}) == 1, log.read_text()[-3000:]
    assert "2 non-finite steps in a row in task 1 (t0) at step 3" in log.read_text()
    assert [m["bad_in_a_row"] for m in rs.read_metrics(tmp_path / "run") if m["kind"] == "train"] == [0, 1, 2]
