"""ML-Mamba for transformers: `MLMambaConfig`, `MLMambaForConditionalGeneration`, `MLMambaModel`.

Importing the package registers the classes with transformers' Auto classes, so that `AutoConfig`, `AutoModel`,
`AutoModelForImageTextToText`, `AutoModelForCausalLM`, `AutoImageProcessor` and `AutoProcessor` resolve
`model_type="mlmamba"` without remote code.
"""

from . import transformers_compat  # noqa: F401  first: checks the installed transformers release (one clear error)

from transformers import (  # noqa: E402
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .configuration_mlmamba import MLMambaConfig  # noqa: E402
from .image_processing_mlmamba import MLMambaImageProcessor
from .modeling_mlmamba import MLMambaForConditionalGeneration, MLMambaModel, MLMambaPreTrainedModel
from .processing_mlmamba import MLMambaProcessor

__version__ = "0.1.0"

AutoConfig.register("mlmamba", MLMambaConfig, exist_ok=True)
for _auto in (AutoModel, AutoModelForImageTextToText, AutoModelForCausalLM):
    _auto.register(MLMambaConfig, MLMambaForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(MLMambaConfig, image_processor_classes={"pil": MLMambaImageProcessor}, exist_ok=True)
AutoProcessor.register(MLMambaConfig, MLMambaProcessor, exist_ok=True)

__all__ = [
    "MLMambaConfig",
    "MLMambaForConditionalGeneration",
    "MLMambaImageProcessor",
    "MLMambaModel",
    "MLMambaPreTrainedModel",
    "MLMambaProcessor",
]
