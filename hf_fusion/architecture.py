"""What transformers knows about a checkpoint's architecture, read without loading weights.

Some methods act on a kind of layer only (FusionBench's DARE ``only_on_linear_weights``). The model class named in
``config.json`` is instantiated on the meta device (no memory, a few milliseconds) to map each parameter to the
type of the module that owns it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from hf_fusion.engine.layers import rename_layer
from hf_fusion.engine.plan import align_names
from hf_fusion.errors import RecipeError

log = logging.getLogger(__name__)


def parameter_module_types(folder: Path, names: Sequence[str]) -> dict[str, str]:
    """Maps checkpoint tensor names to the class name of the module owning them (``Linear``, ``LayerNorm``, ...).

    A name in a layer the model lacks (an output stacked from slices has more layers than its inputs) takes the
    module type of the same tensor in layer 0. Raises :class:`RecipeError` when the folder has no transformers
    architecture to instantiate.
    """
    import torch
    import transformers

    config_path = folder / "config.json"
    try:
        architectures = json.loads(config_path.read_text()).get("architectures") or []
    except (OSError, ValueError):
        architectures = []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        raise RecipeError(
            f"{folder}: needs a transformers architecture in config.json to tell linear layers apart "
            f"(found {architectures or 'none'})."
        )
    config = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = model_class(config)
    owners: dict[str, str] = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            owners[f"{module_name}.{param_name}" if module_name else param_name] = type(module).__name__
    matched = align_names(names, owners)
    beyond = {n: rename_layer(n, 0) for n in names if n not in matched}
    in_first_layer = align_names(list(beyond.values()), owners)
    matched.update({n: in_first_layer[first] for n, first in beyond.items() if first in in_first_layer})
    if len(matched) < len(names):
        log.warning(
            "%d tensor(s) of %s match no parameter of %s; they count as non-linear",
            len(names) - len(matched),
            folder,
            model_class.__name__,
        )
    return {name: owners[matched[name]] for name in matched}
