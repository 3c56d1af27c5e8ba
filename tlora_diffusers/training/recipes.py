"""Which training recipe a pipeline gets: its denoiser family's recipe for the pipeline class (or a base class)."""

from __future__ import annotations

from typing import Any

from ..models import model_families, pipeline_denoisers
from .recipe import Recipe

__all__ = ["recipe_for", "trainable_pipelines"]


def trainable_pipelines() -> list[str]:
    return sorted(name for family in model_families().values() for name in family.recipes)


def recipe_for(pipe: Any) -> Recipe:
    """The recipe of the first pipeline class along ``type(pipe).__mro__`` that a family trains."""
    recipes = {name: recipe for family in model_families().values() for name, recipe in family.recipes.items()}
    for cls in type(pipe).__mro__:
        if cls.__name__ in recipes:
            recipe = recipes[cls.__name__]
            if recipe.component not in pipeline_denoisers(pipe):
                raise ValueError(f"{type(pipe).__name__} has no {recipe.component} to train")
            return recipe
    raise ValueError(
        f"training supports {', '.join(trainable_pipelines())}; got {type(pipe).__name__}. Pass a local folder of one "
        "of these pipelines (other families train once their model file defines a Recipe)"
    )
