"""Train a diffusion model through a sequence of reward tasks (Reward Incremental Learning).

    python -m ril_fast.train --config configs/tiny.json                 # embedded model, CPU
    deepspeed ril_fast/train.py --config configs/sdxl.json              # DeepSpeed launcher, 1..N GPUs
    python -m ril_fast.train --config configs/tiny.json --set method.name=baseline --set tasks.0.steps=5

Rerunning the same command with the same ``output_dir`` resumes from the newest good checkpoint.

Features and their switches: method (``method.name``: baseline | group | distill | rid), EMA teacher
(``method.ema_decay``), last-step or full-chain distillation (``method.distill_mode``) on x0 / eps /
image (``method.distill_target``), gradient window K (``sampling.grad_window[_max]``), UNet and VAE
checkpointing (``sampling.checkpoint_unet``, ``memory.vae_checkpoint``), 8-bit AdamW
(``train.optimizer``), DeepSpeed ZeRO and offload (``deepspeed.*``), checkpoints every N steps
(``train.checkpoint_every``), non-finite step skipping (``train.max_bad_steps``).
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys

if __package__ in (None, ""):  # `deepspeed ril_fast/train.py` runs this file as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ril_fast.config import ConfigError, check_available, load_config  # noqa: E402


def parse_args(argv=None, prog: str = "python -m ril_fast.train") -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="JSON config (configs/tiny.json is the embedded default)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set tasks.0.steps=5 (repeatable)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher
    return parser.parse_args(argv)


def main(argv=None, prog: str = "python -m ril_fast.train") -> int:
    args = parse_args(argv, prog)
    try:
        return _main(args)
    except KeyboardInterrupt as exc:  # one line, never a traceback; RunStopped says where and how to resume
        message = getattr(exc, "message", "") or "interrupted before training started; nothing to resume"
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"ril_fast: {message}", file=sys.stderr, flush=True)
        return 128 + getattr(exc, "signum", signal.SIGINT)


def _main(args) -> int:
    try:
        cfg = load_config(args.config, args.set)
        check_available(cfg)  # before the run folder exists and before any planning or loading
        from ril_fast.runner import preflight

        preflight(cfg)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"ril_fast: config error: {problem}", file=sys.stderr)
        return 2
    from ril_fast.runner import FatalRunError, run_all

    try:
        run_all(cfg)
    except ConfigError as exc:  # found while loading the model or building rewards, before training
        for problem in exc.problems:
            print(f"ril_fast: config error: {problem}", file=sys.stderr)
        return 2
    except FatalRunError as exc:
        print(f"ril_fast: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno not in _DISK_FULL:
            raise
        # metrics, results.json, grids, plots, adapters: whatever filled the disk, the checkpoints are
        # written atomically and verified, so the same command resumes once there is space
        print(f"ril_fast: cannot write {exc.filename or 'under ' + str(cfg.output_dir)} ({exc.strerror or exc}); "
              "the last checkpoint is intact: free space and rerun the same command", file=sys.stderr)
        return 1
    return 0


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


if __name__ == "__main__":
    sys.exit(main())
