"""ril_fast: a fast trainer for Reward Incremental Learning of text-to-image diffusion models.

Importing the package is cheap: heavy modules (diffusers, deepspeed, triton) load on first use.
"""

__version__ = "0.1.0"


def load_pipeline(run_dir, task: int, **kwargs):
    """Return a stock diffusers pipeline with the adapters of tasks 1..task loaded and active.

    See :func:`ril_fast.lora.export.load_pipeline`.
    """
    from ril_fast.lora.export import load_pipeline as _load

    return _load(run_dir, task=task, **kwargs)
