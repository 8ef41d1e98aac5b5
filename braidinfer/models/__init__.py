"""Model architectures, one file each, built from the shared layers."""
from braidinfer.models.config import ModelConfig
from braidinfer.models.registry import ARCHITECTURES, model_class

__all__ = ["ARCHITECTURES", "ModelConfig", "model_class"]
