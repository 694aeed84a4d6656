"""The output config of a sliced stack: layer count under the architecture's own key, per-layer lists rebuilt."""

from __future__ import annotations

import json
from pathlib import Path

from hf_fusion.model_files import config_layers, set_config_layers


def test_layer_count_and_per_layer_lists_follow_the_origins(tmp_path: Path) -> None:
    a = {"n_layer": 3, "layer_types": ["x0", "x1", "x2"], "no_rope": [1, 0, 1], "vocab": [7, 8]}
    b = {"n_layer": 3, "layer_types": ["y0", "y1", "y2"]}
    (tmp_path / "config.json").write_text(json.dumps(a))
    set_config_layers(tmp_path, [(a, 2), (b, 0), (b, 1), (a, 0)])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["n_layer"] == 4 and config_layers(config) == 4 and "num_hidden_layers" not in config
    assert config["layer_types"] == ["x2", "y0", "y1", "x0"]
    assert "no_rope" not in config  # b has no such list: transformers derives its default again
    assert config["vocab"] == [7, 8]  # not one entry per layer
