"""ML-Mamba for transformers: `MLMambaConfig`, `MLMambaForConditionalGeneration`, `MLMambaModel`.

Importing the package registers the classes with transformers' Auto classes, so that `AutoConfig`, `AutoModel`,
`AutoModelForImageTextToText` and `AutoModelForCausalLM` resolve `model_type="mlmamba"` without remote code.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
)

from .configuration_mlmamba import MLMambaConfig
from .modeling_mlmamba import MLMambaForConditionalGeneration, MLMambaModel, MLMambaPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register("mlmamba", MLMambaConfig, exist_ok=True)
for _auto in (AutoModel, AutoModelForImageTextToText, AutoModelForCausalLM):
    _auto.register(MLMambaConfig, MLMambaForConditionalGeneration, exist_ok=True)

__all__ = ["MLMambaConfig", "MLMambaForConditionalGeneration", "MLMambaModel", "MLMambaPreTrainedModel"]
