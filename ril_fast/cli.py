"""``ril-fast``: one command for everything a user does with ril_fast.

    ril-fast train --config configs/tiny.json              train (and resume) a task sequence
    ril-fast plan --config configs/sdxl.json               will it fit? the memory planner
    ril-fast sample runs/tiny --task 2 --prompt "a red circle on a blue background"
    ril-fast eval runs/tiny --set eval.seeds=[0,1,2,3]     re-score every row of a finished run
    ril-fast rewards                                       the rewards a task can name
    ril-fast info                                          versions, device, kernel backends

``python -m ril_fast.train`` and ``deepspeed ril_fast/train.py`` stay the entry points under a launcher.
"""

from __future__ import annotations

import argparse
import platform
import sys

COMMANDS = {
    "train": "train a task sequence from a JSON config; rerun the same command to resume",
    "plan": "will a config fit? the memory planner's peak for its training step and evaluation",
    "sample": "draw images with a finished run's adapters (any task prefix; task 0 = the base model)",
    "eval": "re-score every row of a run's reward matrix from its exported adapters",
    "rewards": "list the built-in rewards, one line each",
    "info": "versions, device, and which kernel backend each fused op uses here",
}
_PASSTHROUGH = ("train", "plan")  # their own parsers hold their options


def build_parser() -> argparse.ArgumentParser:
    from ril_fast import __version__

    parser = argparse.ArgumentParser(prog="ril-fast", description=__doc__.replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Run `ril-fast COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"ril-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _PASSTHROUGH:
        sub.add_parser(name, help=COMMANDS[name], add_help=False)
    sample = sub.add_parser("sample", help=COMMANDS["sample"], description=COMMANDS["sample"] + ". The starting "
                            "noise of each seed is the trainer's evaluation noise, so a prompt and seed of the "
                            "run's evaluation give the image in its grid.")
    sample.add_argument("run", help="the run's output_dir")
    sample.add_argument("--task", type=int, required=True, help="adapters of tasks 1..TASK active (0 = base model)")
    sample.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    sample.add_argument("--seed", type=int, action="append", help="seeds (repeatable; default: the run's eval.seeds)")
    sample.add_argument("--steps", type=int, help="DDIM steps (default: the run's eval steps)")
    sample.add_argument("--guidance", type=float, help="classifier-free guidance (default: the run's)")
    sample.add_argument("--out", help="output PNG (default: RUN/samples/task_NN.png)")
    evaluate = sub.add_parser("eval", help=COMMANDS["eval"], description=COMMANDS["eval"] + ", with the run's "
                              "config and any --set overrides; writes RUN/eval/rescore.json")
    evaluate.add_argument("run", help="the run's output_dir")
    evaluate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="override the run's config, e.g. --set eval.seeds=[0,1,2,3] (repeatable)")
    sub.add_parser("rewards", help=COMMANDS["rewards"], description=COMMANDS["rewards"])
    sub.add_parser("info", help=COMMANDS["info"], description=COMMANDS["info"])
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] in _PASSTHROUGH:
        if argv[0] == "train":
            from ril_fast.train import main as train

            return train(argv[1:], prog="ril-fast train")
        from ril_fast.memory import main as plan

        return plan(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "info":
        info()
        return 0
    if args.command == "rewards":
        print(rewards_listing())
        return 0
    from ril_fast.config import ConfigError

    try:
        return sample(args) if args.command == "sample" else rescore(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"ril-fast: {problem}", file=sys.stderr)
        return 2
    except ValueError as exc:  # load_pipeline: no such run or task
        print(f"ril-fast: {exc}", file=sys.stderr)
        return 2


def rewards_listing() -> str:
    """Every built-in reward with the first line of its docstring; model-based ones say where weights come from."""
    import importlib

    from ril_fast import rewards

    lines = []
    for name in rewards.names():
        module, attr = rewards._REGISTRY[name]
        doc = (getattr(importlib.import_module(module), attr).__doc__ or "").strip()
        lines.append(f"  {name:24s} {doc.splitlines()[0] if doc else ''}")
    lines.append("  module:function          your own: (images [B,3,H,W] in [0,1], prompts) -> Tensor[B], higher is "
                 "better")
    return "rewards (tasks.N.reward; model weights: docs/rewards.md):\n" + "\n".join(lines)


def sample(args) -> int:
    import json
    from pathlib import Path

    import torch
    from diffusers import DDIMScheduler

    from ril_fast import load_pipeline, report
    from ril_fast.evaluate import eval_noise

    run = Path(args.run)
    pipe = load_pipeline(run, task=args.task)
    cfg = json.loads((run / "config.json").read_text(encoding="utf-8"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = pipe.to(device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # the trainer's sampler
    pipe.set_progress_bar_config(disable=True)
    seeds = args.seed or cfg["eval"]["seeds"]
    steps = args.steps or cfg["eval"]["steps"] or cfg["sampling"]["steps"]
    guidance = cfg["sampling"]["guidance_scale"] if args.guidance is None else args.guidance
    scale = pipe.vae_scale_factor
    height = cfg["sampling"]["height"] or pipe.unet.config.sample_size * scale
    width = cfg["sampling"]["width"] or pipe.unet.config.sample_size * scale
    shape = (1, pipe.unet.config.in_channels, height // scale, width // scale)
    images = []
    for prompt in args.prompt:
        for seed in seeds:
            latents = eval_noise(lambda n: (n, *shape[1:]), seed, prompt).to(device, pipe.unet.dtype)
            out = pipe([prompt], negative_prompt=[cfg["sampling"]["negative_prompt"]], num_inference_steps=steps,
                       guidance_scale=guidance, latents=latents, output_type="pt", height=height, width=width)
            images.append(out.images[0].float().cpu())
    title = ("base model" if args.task == 0 else f"after task {args.task}") + f": {steps} DDIM steps, CFG {guidance}"
    grid = report.image_grid(torch.stack(images), len(seeds), row_labels=args.prompt,
                             col_labels=[f"seed {s}" for s in seeds], title=title)
    path = Path(args.out) if args.out else run / "samples" / f"task_{args.task:02d}.png"
    report.save_png(grid, path)
    print(f"wrote {path} ({len(args.prompt)} prompts x {len(seeds)} seeds)")
    return 0


def rescore(args) -> int:
    from ril_fast.rescore import rescore as run_rescore

    out = run_rescore(args.run, args.set)
    width = max(len(r) for r in out["rows"])
    print(" " * width + "  " + "  ".join(f"{c:>12s}" for c in out["columns"]))
    for label, values in zip(out["rows"], out["reward_matrix"]):
        print(f"{label:{width}s}  " + "  ".join(f"{v:12.5g}" for v in values))
    print(f"wrote {args.run}/eval/rescore.json")
    return 0


def info() -> None:
    import torch

    from ril_fast import __version__
    from ril_fast.kernels import dispatch

    print(f"ril_fast {__version__}  python {platform.python_version()}  torch {torch.__version__}")
    for name in ("triton", "diffusers", "transformers", "peft", "deepspeed", "bitsandbytes"):
        try:
            module = __import__(name)
            print(f"  {name:13s} {getattr(module, '__version__', '?')}")
        except Exception as exc:  # report, never fail: this is a diagnostic
            print(f"  {name:13s} unavailable ({type(exc).__name__}: {exc})")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    print(f"RIL_FAST_KERNELS={dispatch.requested_backend()}")
    for check in (dispatch.cuda_lib_available, dispatch.triton_available):
        ok, why = check(device)
        print(f"  {check.__name__:20s} {'yes' if ok else 'no'}: {why}")
    for op in ("lora_group_linear", "distill_mse"):
        print(f"  {op:20s} -> {dispatch.select_backend(op, device)}")


if __name__ == "__main__":
    sys.exit(main())
