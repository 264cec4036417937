"""`python -m ril_fast`: versions, devices, and which kernel backend each op would use, and why
(``ril-fast info``). With arguments it is the ``ril-fast`` command: ``python -m ril_fast train ...``."""

from __future__ import annotations

import platform
import sys


def main(argv: list[str] | None = None) -> int:
    if argv:
        from ril_fast.cli import main as cli

        return cli(argv)
    info()
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
    sys.exit(main(sys.argv[1:]))
