"""Metrics through ``evaluate``: from the Hub by name when online, from the modules bundled here when offline.

The source is chosen explicitly (``hub``, ``bundled``, or ``auto``: bundled exactly when ``HF_HUB_OFFLINE`` is set)
and recorded in every report; a Hub metric that cannot be fetched is an error, never a silent substitution.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from hf_fusion.errors import FusionError

MetricSource = Literal["auto", "hub", "bundled"]
BUNDLED = ("accuracy", "exact_match", "spearmanr", "perplexity", "clip_score")
HUB_ONLY_INTERFACE = {"perplexity", "clip_score"}
"""Always the bundled module: the Hub's perplexity reloads a model by id (ours takes log-likelihoods), and the CLIP
score is hf-fusion's own (it takes the CLIP model as an argument)."""


class MetricError(FusionError):
    """A metric cannot be loaded."""


def resolve_source(source: MetricSource) -> Literal["hub", "bundled"]:
    if source != "auto":
        return source
    from huggingface_hub import constants

    return "bundled" if constants.is_offline_mode() else "hub"


def load_metric(name: str, source: MetricSource = "auto") -> tuple[Any, str]:
    """The ``evaluate`` module for ``name`` and where it came from (``hub`` or ``bundled``)."""
    import evaluate

    where = "bundled" if name in HUB_ONLY_INTERFACE else resolve_source(source)
    if where == "bundled":
        if name not in BUNDLED:
            raise MetricError(f"no bundled module for metric {name!r}; bundled: {', '.join(BUNDLED)}.")
        return evaluate.load(str(Path(__file__).parent / name)), "bundled"
    try:
        return evaluate.load(name), "hub"
    except Exception as err:  # evaluate raises many kinds for a missing network or module
        raise MetricError(
            f"cannot load metric {name!r} from the Hub ({err.__class__.__name__}). Without network, set "
            "HF_HUB_OFFLINE=1 (or pass --metrics bundled) to use hf-fusion's bundled metric modules."
        ) from None
