"""forge: a build tool for LLM serving artifacts."""
from forge.core.errors import ExitCode, ForgeError

__version__ = "0.1.0"
__all__ = ["__version__", "ExitCode", "ForgeError"]
