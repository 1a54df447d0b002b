"""Recipes shipped with the package (``demo``, ``synthquestions``) and the code that loads and runs them."""

from synthq_hf.recipes.recipe import Recipe, RecipeError, bundled_recipes, load_recipe

__all__ = ["Recipe", "RecipeError", "bundled_recipes", "load_recipe", "run_recipe"]


def run_recipe(*args, **kwargs):
    """See :func:`synthq_hf.recipes.runner.run_recipe` (imported on use: it pulls in every stage)."""
    from synthq_hf.recipes.runner import run_recipe as run

    return run(*args, **kwargs)
