"""hicache: training-free feature caching for diffusion transformers (HiCache, TaylorSeer, FORA, ClusCa).

    import hicache
    handle = hicache.apply_cache(pipe.transformer, hicache.CacheConfig("hicache", interval=7, order=2), "flux")
    image = pipe(prompt).images[0]
    print(hicache.cache_summary(pipe.transformer, 50))
"""

from .api import CacheHandle, CacheSummary, apply_cache, cache_context, cache_summary, remove_cache, reset_cache
from .check import RecipeReport, candidate_modules, check_recipe
from .config import CacheConfig
from .forecast import METHODS
from .memory import MemoryEstimate, estimate_memory
from .recipes import ClusterSource, FreshTokens, Recipe, available_recipes, get_recipe, register_recipe

__all__ = [
    "CacheConfig",
    "CacheHandle",
    "CacheSummary",
    "ClusterSource",
    "FreshTokens",
    "METHODS",
    "MemoryEstimate",
    "Recipe",
    "RecipeReport",
    "apply_cache",
    "available_recipes",
    "cache_context",
    "cache_summary",
    "candidate_modules",
    "check_recipe",
    "estimate_memory",
    "get_recipe",
    "register_recipe",
    "remove_cache",
    "reset_cache",
]

__version__ = "0.1.0"
