"""The ``tlora-diffusers`` command line: ``schedule``, ``generate``, ``inspect``, ``convert``.

Example:
    >>> from tlora_diffusers.cli import main
    >>> main(["schedule", "--max-rank", "8", "--steps", "4"])
    0
"""

from .main import main

__all__ = ["main"]
