"""The modeling code of hf-fusion's own architectures, shipped inside the fused model that uses it.

An ensemble or a routed mixture (WEMoE, SMILE, up-scaled MoE) is not a stock transformers class. Its folder gets
the source files that define it, byte for byte those of :mod:`hf_fusion.models` (they import only torch,
transformers and each other, relatively), and ``config.json`` gets an ``auto_map`` naming them. Stock transformers
then loads the folder or its Hub repo with ``trust_remote_code=True``, without hf-fusion; with hf-fusion installed,
``import hf_fusion.models`` registers the same classes and it loads without remote code, because transformers
prefers a registered model type over ``auto_map`` unless remote code is asked for.

Which files travel is decided by transformers' own rule for remote code (``get_relative_import_files``), so the
set is the one its loader will look for.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

MODELING_FILES = ("ensemble.py", "upscaled.py", "members.py")
"""Every file :func:`ship_modeling_code` may write (the output allow-list and pushes include them)."""


def ship_modeling_code(folder: Path) -> list[str]:
    """Copies the modeling files of the folder's hf-fusion architecture next to its ``config.json`` and registers
    them in ``auto_map``; returns the file names written (none for a stock architecture)."""
    from transformers.dynamic_module_utils import get_relative_import_files

    import hf_fusion.models as models

    config_path = folder / "config.json"
    if not config_path.is_file():
        return []
    config = json.loads(config_path.read_text())
    classes = {
        config_class.model_type: (config_class, model_class)
        for config_class, model_class in (
            (models.FusedEnsembleConfig, models.FusedEnsembleModel),
            (models.FusedUpscaledConfig, models.FusedUpscaledModel),
        )
    }
    entry = classes.get(config.get("model_type"))
    if entry is None:
        return []
    config_class, model_class = entry
    source = Path(inspect.getfile(model_class))
    files = [source, *map(Path, get_relative_import_files(str(source)))]
    for file in files:
        if file.name not in MODELING_FILES:
            raise AssertionError(f"{file.name} is not in MODELING_FILES")  # keeps the allow-list honest
        shutil.copyfile(file, folder / file.name)
    module = source.stem
    config["auto_map"] = {
        "AutoConfig": f"{module}.{config_class.__name__}",
        "AutoModel": f"{module}.{model_class.__name__}",
    }
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return [f.name for f in files]
