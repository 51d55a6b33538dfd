"""icelora: knowledge editing of causal language models with In-Context Editing trained into LoRA."""

__version__ = "0.1.0"

from icelora.config import EditConfig
from icelora.errors import IceloraError
from icelora.icelora_editor import EditResult, ICELoRAEditor
from icelora.methods import METHODS, method_config
from icelora.models import EMBEDDED_MODEL, LoadedModel, load_model
from icelora.request import EditRequest

__all__ = [
           "EMBEDDED_MODEL",
           "METHODS",
           "EditConfig",
           "EditRequest",
           "EditResult",
           "ICELoRAEditor",
           "IceloraError",
           "LoadedModel",
           "__version__",
           "load_model",
           "method_config",
]
