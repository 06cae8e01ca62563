"""Stand-in for Unsloth (fork-sidecar CPU tests): importing the package imports the model modules, as Unsloth does."""

__version__ = "0+fake"

from .models import FastLlamaModel  # noqa: F401
