"""Planted bugs the test suite must catch (``make mutants``).

Each mutant is one exact edit of one source file: a snippet that must occur exactly once, its
replacement, and the tests that claim the behaviour it breaks. For each mutant the tracked files of
the repository (with their working-tree contents) are copied to a scratch folder, the edit is
applied there, and only the listed tests run (``pytest``, every listed test, no ``-x``). A mutant is
*killed* when at least one listed test fails; it *survived* when they all pass. Before the mutants,
the union of the listed tests runs once on the unmutated copy: a test that fails there cannot kill
anything.

A snippet that no longer matches exactly once is an error, never a silent skip: the list is checked
against the current source by ``tests/test_mutants_list.py`` in the normal suite, so a refactor that
moves the code re-points the mutant instead of letting it rot.

Usage: ``python tools/mutants.py [--only ID ...] [--no-baseline] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "cpu" / "mutants.json"


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str  # relative to the repository root
    snippet: str  # must occur exactly once in the file
    replacement: str
    tests: tuple[str, ...]  # pytest node ids that claim the behaviour
    what: str  # the bug, in words


MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "tracker_undercount", "ril_fast/memory_tracker.py",
        "nbytes, tag = storage.nbytes(), self.tags[-1]",
        "nbytes, tag = storage.nbytes() // 3, self.tags[-1]",
        ("tests/test_memory.py::test_tracker_counts_a_hand_built_allocation_sequence",
         "tests/test_memory.py::test_fake_plan_matches_the_real_trainer_step"),
        "the memory tracker counts every storage at a third of its size"),
    Mutant(
        "deterministic_off", "ril_fast/kernels/lora_group.py",
        "det, ops = deterministic(), _compiling()",
        "det, ops = False, _compiling()",
        ("tests/test_kernels_lora.py::test_deterministic_mode_is_bitwise_repeatable",),
        "the LoRA backward ignores torch's deterministic mode (atomics instead of ordered sums)"),
    Mutant(
        "restore_rng_noop", "ril_fast/checkpoint.py",
        '    torch.set_rng_state(tensors["torch"])\n',
        "    pass\n",
        ("tests/test_reliability_resume.py::test_each_rank_gets_its_own_rng_state_back",
         "tests/test_reliability_resume.py::test_resume_after_kills_at_every_point"),
        "a resumed run does not get the checkpoint's RNG state back"),
    Mutant(
        "teacher_noop", "ril_fast/methods/teacher.py",
        "        else:\n            layer.use_teacher = True\n",
        "        else:\n            pass\n",
        ("tests/test_methods_baselines.py::test_last_step_target_against_the_merged_teacher",
         "tests/test_methods_teacher.py::test_teacher_mode_uses_ema_and_blocks_grads"),
        "teacher_mode runs the student (the EMA teacher is never used)"),
    Mutant(
        "ema_update_noop", "ril_fast/methods/teacher.py",
        "        torch._foreach_lerp_(ema, params, 1.0 - decay)\n",
        "        pass\n",
        ("tests/test_methods_teacher.py::test_ema_update_arithmetic",),
        "the EMA teacher is never updated"),
    Mutant(
        "forgetting_off_by_a_row", "ril_fast/evaluate_metrics.py",
        "forgetting = [_finite(M[c + 1 : n, c].max() - M[n, c]) for c in old]",
        "forgetting = [_finite(M[c : n, c].max() - M[n, c]) for c in old]",
        ("tests/test_evaluate_metrics.py::test_forgetting_starts_after_the_task_was_learned",),
        "forgetting counts the row before the task was learned"),
    Mutant(
        "window_not_detached", "ril_fast/sampling.py",
        "            x = x.detach()  # DRaFT-K: nothing flows back past the window\n"
        "        with torch.set_grad_enabled(in_window and torch.is_grad_enabled()):\n",
        "            x = x\n"
        "        with torch.set_grad_enabled(torch.is_grad_enabled()):\n",
        ("tests/test_sampling.py::test_gradient_window_matches_brute_force",),
        "gradients flow through the whole chain, not only the last K steps"),
    Mutant(
        "frozen_adapter_trainable", "ril_fast/lora/group.py",
        "        for p in list(self.lora_a) + list(self.lora_b):\n            p.requires_grad_(False)\n",
        "        for p in list(self.lora_a) + list(self.lora_b):\n            p.requires_grad_(True)\n",
        ("tests/test_lora.py::test_add_task_keeps_output_and_freezes",),
        "earlier adapters stay trainable when a task is added"),
    Mutant(
        "ddim_eta_ignored", "ril_fast/sampling.py",
        "x = scheduler.step(out, t, x, eta=eta, variance_noise=noise).prev_sample",
        "x = scheduler.step(out, t, x, eta=0.0).prev_sample",
        ("tests/test_sampling.py::test_no_grad_chain_matches_diffusers_pipeline",),
        "sampling.eta is ignored (DDIM always deterministic)"),
    Mutant(
        "reward_sign_flipped", "ril_fast/step.py",
        "loss = -m.reward_weight * scored.mean()",
        "loss = m.reward_weight * scored.mean()",
        ("tests/test_step.py::test_loss_assembly",),
        "the loss rewards a lower reward"),
    Mutant(
        "distill_weight_ignored", "ril_fast/step.py",
        "loss = loss + m.distill_weight * distill",
        "loss = loss + distill",
        ("tests/test_step.py::test_loss_assembly",),
        "λ (method.distill_weight) is ignored"),
    Mutant(
        "reward_norm_scale_ignored", "ril_fast/rewards/normalize.py",
        "        return (reward - offset) / scale\n",
        "        return reward - offset\n",
        ("tests/test_methods_baselines.py::test_reward_normalisation_enters_the_loss",),
        "reward normalisation subtracts the offset but ignores the scale"),
    Mutant(
        "eps_v_prediction_sign", "ril_fast/methods/distill.py",
        "return ab.sqrt() * out + (1 - ab).sqrt() * x_t",
        "return ab.sqrt() * out - (1 - ab).sqrt() * x_t",
        ("tests/test_methods_baselines.py::test_lambda_means_the_same_on_every_scheduler",),
        "ε recovered from a v-prediction output with the wrong sign"),
    Mutant(
        "x0_target_not_in_eps_units", "ril_fast/methods/distill.py",
        "        weight = eps_units(sample.alpha_bar)\n",
        "        weight = None\n",
        ("tests/test_methods_distill.py::test_last_step_x0_matches_scheduler_math",),
        "the x0 distillation loss is not weighted into ε units (λ means something else on every model)"),
    Mutant(
        "adherence_wrong_prompts", "ril_fast/evaluate.py",
        "[p for _, ps in sets for p in ps])",
        "[p for _, ps in sets for p in ps][::-1])",
        ("tests/test_make_run.py::test_prompt_adherence_figures_are_the_classifiers",),
        "results.json's prompt adherence judges each image against another image's prompt"),
    Mutant(
        "table_prints_base_row", "ril_fast/results.py",
        '"reward_matrix": res["reward_matrix"],',
        '"reward_matrix": res["reward_matrix"][:1] * len(res["reward_matrix"]),',
        ("tests/test_make_run.py::test_printed_table_holds_results_json",),
        "the printed table repeats the base model's rewards in every row"),
    Mutant(
        "full_chain_sum_not_mean", "ril_fast/methods/distill.py",
        "    return torch.stack(losses).mean()\n",
        "    return torch.stack(losses).sum()\n",
        ("tests/test_methods_baselines.py::test_full_chain_matches_a_brute_force_loop",),
        "full-chain distillation sums the window's steps instead of averaging them"),
    Mutant(
        "full_chain_noise_not_shared", "ril_fast/methods/distill.py",
        "generator = torch.Generator(z_T.device).manual_seed(generator_seed)",
        "generator = torch.Generator(z_T.device).manual_seed(generator_seed + 1)",
        ("tests/test_methods_baselines.py::test_full_chain_matches_a_brute_force_loop",),
        "at eta > 0 the teacher's chain draws other variance noise than the student's"),
)


class SnippetError(ValueError):
    """A mutant's snippet does not occur exactly once in its file."""


def check(m: Mutant, root: Path = ROOT) -> str:
    """The file's text; raises SnippetError unless the snippet occurs exactly once."""
    path = root / m.file
    if not path.is_file():
        raise SnippetError(f"{m.id}: {m.file} does not exist")
    text = path.read_text(encoding="utf-8")
    count = text.count(m.snippet)
    if count != 1:
        raise SnippetError(f"{m.id}: snippet occurs {count} times in {m.file} (must be exactly once): {m.snippet!r}")
    return text


def _scratch_copy(dest: Path) -> None:
    """Tracked files as they are in the working tree (uncommitted edits included)."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    for name in names.decode().split("\0"):
        src = ROOT / name
        if not name or not src.is_file():
            continue
        out = dest / name
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, out)


def _pytest(copy: Path, tests, timeout: float) -> tuple[int, str, float]:
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *tests]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out = 124, f"timed out after {timeout:.0f} s\n{exc.stdout or ''}"
    return rc, out, time.perf_counter() - start


def _failed(output: str) -> list[str]:
    return sorted({m.group(2) for m in re.finditer(r"^(FAILED|ERROR) (\S+)", output, re.M)})


def run(mutants, *, baseline: bool = True, timeout: float = 900.0) -> dict:
    for m in mutants:  # every snippet matches before any test runs
        check(m)
    results, t0 = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ril-mutants-") as tmp:
        copy = Path(tmp)
        _scratch_copy(copy)
        probe = subprocess.run([sys.executable, "-c", "import ril_fast; print(ril_fast.__file__)"], cwd=copy,
                               env=dict(os.environ, PYTHONPATH=str(copy)), capture_output=True, text=True)
        if not probe.stdout.strip().startswith(str(copy)):
            raise SystemExit(f"the scratch copy's ril_fast is not the one imported: {probe.stdout}{probe.stderr}")
        base = None
        if baseline:
            tests = sorted({t for m in mutants for t in m.tests})
            print(f"baseline: {len(tests)} tests on the unmutated copy ...", flush=True)
            rc, out, secs = _pytest(copy, tests, timeout)
            base = {"rc": rc, "seconds": round(secs, 1), "failed": _failed(out)}
            if rc != 0:
                print(out[-4000:])
                raise SystemExit(f"baseline: the listed tests fail without any mutant (rc {rc}): {base['failed']}")
        for m in mutants:
            path = copy / m.file
            original = path.read_text(encoding="utf-8")
            path.write_text(original.replace(m.snippet, m.replacement, 1), encoding="utf-8")
            try:
                rc, out, secs = _pytest(copy, m.tests, timeout)
            finally:
                path.write_text(original, encoding="utf-8")
            failed = _failed(out)
            status = "killed" if rc == 1 and failed else "survived" if rc == 0 else f"error (pytest rc {rc})"
            if status.startswith("error"):
                print(out[-3000:])
            results.append({**asdict(m), "status": status, "killed_by": failed, "seconds": round(secs, 1)})
            print(f"{m.id:28s} {status:9s} {secs:6.1f} s  {', '.join(failed)}", flush=True)
    return {"mutants": results, "baseline": base, "total_seconds": round(time.perf_counter() - t0, 1),
            "killed": sum(r["status"] == "killed" for r in results), "total": len(results)}


def table(report: dict) -> str:
    rows = ["| mutant | status | killed by | s |", "|---|---|---|---|"]
    for r in report["mutants"]:
        tests = "<br>".join(f"`{t.split('::', 1)[1]}`" for t in r["killed_by"]) or "—"
        rows.append(f"| `{r['id']}`: {r['what']} | {r['status']} | {tests} | {r['seconds']:.0f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="ID", help="run these mutants only")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the listed tests")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"where to write the results ({DEFAULT_JSON})")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run")
    args = ap.parse_args(argv)
    mutants = MUTANTS
    if args.only:
        unknown = set(args.only) - {m.id for m in MUTANTS}
        if unknown:
            ap.error(f"unknown mutant(s): {sorted(unknown)}")
        mutants = tuple(m for m in MUTANTS if m.id in args.only)
    report = run(mutants, baseline=not args.no_baseline, timeout=args.timeout)
    print(table(report))
    print(f"{report['killed']}/{report['total']} killed in {report['total_seconds']:.0f} s")
    if not args.only:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0 if report["killed"] == report["total"] else 1


if __name__ == "__main__":
    sys.exit(main())
