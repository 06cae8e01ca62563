"""A second model module holding the kernels through `from .llama import *`."""

from .llama import *  # noqa: F403


class FastMistralModel:
    pass
