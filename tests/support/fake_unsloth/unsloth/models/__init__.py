from .llama import FastLlamaModel  # noqa: F401
from .mistral import FastMistralModel  # noqa: F401
