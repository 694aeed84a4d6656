"""hf-fusion: deep model fusion (ensembling, merging, mixing) for models on the Hugging Face Hub.

``hf_fusion.merge(...)`` fuses models into a folder that loads with ``from_pretrained``; ``hf_fusion.Recipe``
describes a fusion; ``hf_fusion.list_methods()`` lists the registered methods. Heavy modules load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hf_fusion.version import __version__

__all__ = ["merge", "Recipe", "MergeResult", "PushTarget", "list_methods", "get_method", "__version__"]

if TYPE_CHECKING:
    from hf_fusion.fusion import MergeResult, merge
    from hf_fusion.hub.push import PushTarget
    from hf_fusion.recipe import Recipe
    from hf_fusion.registry import all_methods as list_methods
    from hf_fusion.registry import get_method


def __getattr__(name: str) -> Any:
    if name in ("merge", "MergeResult"):
        from hf_fusion import fusion

        return getattr(fusion, name)
    if name == "PushTarget":
        from hf_fusion.hub.push import PushTarget

        return PushTarget
    if name == "Recipe":
        from hf_fusion.recipe import Recipe

        return Recipe
    if name in ("list_methods", "get_method"):
        from hf_fusion import registry

        return registry.all_methods if name == "list_methods" else registry.get_method
    raise AttributeError(f"module 'hf_fusion' has no attribute {name!r}")
