"""vit-mqa: Vision Transformers with multi-query and grouped-query attention."""

__version__ = "0.1.0"

# Imported eagerly: beyond torch these cost about 3 % of `import vit_mqa`. Eagerly also
# keeps `vit_mqa.train` the function: a lazy import would let the submodule of the same
# name take its place whenever some other module imported it first.
from .attention import GroupedQueryAttention  # noqa: E402
from .errors import VitMqaError  # noqa: E402
from .explain import attention_rollout  # noqa: E402
from .factory import create_model  # noqa: E402
from .interop import convert_kv_heads, export_onnx, load_external  # noqa: E402
from .model import VisionTransformer, ViTConfig  # noqa: E402
from .predict import Predictor  # noqa: E402
from .train import build_config, train  # noqa: E402

__all__ = ["GroupedQueryAttention", "Predictor", "ViTConfig", "VisionTransformer",
           "VitMqaError", "__version__", "attention_rollout", "build_config",
           "convert_kv_heads", "create_model", "export_onnx", "load_external", "train"]
