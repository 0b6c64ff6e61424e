"""vit-mqa: Vision Transformers with multi-query and grouped-query attention."""

__version__ = "0.1.0"

from .attention import GroupedQueryAttention  # noqa: E402
from .errors import VitMqaError  # noqa: E402
from .model import VisionTransformer, ViTConfig  # noqa: E402

__all__ = ["GroupedQueryAttention", "ViTConfig", "VisionTransformer", "VitMqaError", "__version__"]
