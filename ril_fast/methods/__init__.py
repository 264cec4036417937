"""Methods: the baseline, the ablations and RID, as switches over two mechanisms.

| name     | new adapter per task | EMA-teacher distillation |
| baseline | no (one LoRA keeps training) | no |
| group    | yes | no |
| distill  | no  | yes |
| rid      | yes | yes |

The switches are :attr:`MethodConfig.adapter_per_task` and :attr:`MethodConfig.distill`.
"""

from ril_fast.config import METHODS

__all__ = ["METHODS"]
