"""Model loading (SD1.5 / SDXL / the embedded tiny model), text conditioning, and tiny test models."""

from ril_fast.models.sd import Models, check_model_available, check_model_path, load_models
from ril_fast.models.text import (
    KEEP_TEXT_ENCODERS,
    Conditioning,
    PromptCache,
    cat_conditionings,
    encode_prompts,
    free_text_encoders,
    unet_forward,
)

_TINY = ("build_tiny_pipeline", "save_tiny_pipeline", "tiny_tokenizer")


def __getattr__(name):
    # ril_fast.models.tiny loads on first use: importing it here would run it twice under
    # `python -m ril_fast.models.tiny` (runpy warns about exactly that)
    if name in _TINY:
        from ril_fast.models import tiny

        return getattr(tiny, name)
    raise AttributeError(f"module 'ril_fast.models' has no attribute {name!r}")

__all__ = [
    "KEEP_TEXT_ENCODERS",
    "Conditioning",
    "Models",
    "PromptCache",
    "build_tiny_pipeline",
    "cat_conditionings",
    "check_model_available",
    "check_model_path",
    "encode_prompts",
    "free_text_encoders",
    "load_models",
    "save_tiny_pipeline",
    "tiny_tokenizer",
    "unet_forward",
]
