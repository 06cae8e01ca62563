"""fork-sidecar: makes a `.fork` marker in an ART run take effect on disk, in trainers and in vLLM."""

__all__ = ["__version__"]
__version__ = "0.1.0"
