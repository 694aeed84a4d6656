"""Task data: Hub datasets through ``datasets.load_dataset`` (cached, offline-capable), local data folders, and the
``builtin:`` datasets; ``limit`` keeps a fixed, seeded subset so quick runs are comparable."""

from __future__ import annotations

from typing import Any

from hf_fusion.catalog import BUILTIN_PREFIX, TaskSpec
from hf_fusion.errors import FusionError

SUBSET_SEED = 0  # the shuffle seed of ``limit`` subsets; reports record it so a card can say how the subset was drawn


class DatasetError(FusionError):
    """A task's dataset cannot be loaded."""


def load_examples(spec: TaskSpec, limit: int | None = None) -> Any:
    """The task's split as a ``datasets.Dataset``, shuffled with a fixed seed and cut to ``limit`` examples."""
    if spec.dataset.startswith(BUILTIN_PREFIX):
        from hf_fusion.builtin.text3_data import load_text3

        data = load_text3(spec.dataset[len(BUILTIN_PREFIX) :], spec.split)
    else:
        data = _load_hub_or_local(spec)
    if limit is not None and limit < len(data):
        data = data.shuffle(seed=SUBSET_SEED).select(range(limit))
    return data


def _load_hub_or_local(spec: TaskSpec) -> Any:
    import datasets
    from huggingface_hub import constants

    where = f"{spec.dataset}" + (f" ({spec.config})" if spec.config else "") + f", split {spec.split!r}"
    try:
        return datasets.load_dataset(spec.dataset, spec.config, split=spec.split)
    except (FileNotFoundError, ValueError) as err:
        offline = constants.is_offline_mode()
        hint = (
            "it is not in the local datasets cache (HF_HUB_OFFLINE=1): download it once while online"
            if offline
            else "check the dataset id, config and split, or download it while online and rerun with HF_HUB_OFFLINE=1"
        )
        raise DatasetError(
            f"task {spec.name}: cannot load dataset {where}: {hint} ({err.__class__.__name__})."
        ) from None
    except ConnectionError as err:
        raise DatasetError(
            f"task {spec.name}: cannot reach the Hub for dataset {where} ({err}); rerun with "
            "HF_HUB_OFFLINE=1 to use the cache."
        ) from None


def class_names(spec: TaskSpec, data: Any) -> list[str]:
    """The task's class names: listed in the catalog, else the dataset's label feature, made readable."""
    if spec.class_names:
        return list(spec.class_names)
    feature = data.features.get(spec.label)
    names = getattr(feature, "names", None)
    if not names:
        raise DatasetError(
            f"task {spec.name}: dataset {spec.dataset} has no class names in its {spec.label!r} "
            "feature; list them as class_names in the pool."
        )
    return [name.rsplit("/", 1)[-1].replace("_", " ").strip() for name in names]
