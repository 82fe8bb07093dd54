"""Hope and baseline language models (see docs/hope-design.md)."""

from .config import CMSLevel, ConfigError, ModelConfig
from .lm import LanguageModel, build_model

__all__ = ["CMSLevel", "ConfigError", "ModelConfig", "LanguageModel", "build_model"]
