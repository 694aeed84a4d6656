"""Builds tiny SD 1.x-shaped pipelines, fuses them block-weighted, and draws the comparison grid the README shows.

    python scripts/diffusion_demo.py docs/images/diffusion-grid.png

The pipelines are random (the tests' fixtures, tests/diffusion_models.py), so the pictures are noise; what the grid
shows is the layout: one column per model (the fused one first, then base and inputs), one row per prompt and seed,
all rendered under the same scheduler, steps and seeds.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from diffusion_models import make_sd_pool  # noqa: E402

import hf_fusion  # noqa: E402
from hf_fusion.images.comparison import compare_images  # noqa: E402
from hf_fusion.images.render import RenderSettings  # noqa: E402


def main(output: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="hf-fusion-demo-"))
    try:
        base, experts = make_sd_pool(root, experts=2)
        fused = root / "fused"
        hf_fusion.merge(
            models=[str(e) for e in experts],
            base=str(base),
            method="task_arithmetic",
            scaling_factor=[{"filter": "unet.down_blocks", "value": 0.2}, {"filter": "unet.up_blocks", "value": 0.6}],
            output=fused,
            show_progress=False,
        )
        comparison = compare_images(
            [str(fused), str(base), *map(str, experts)],
            prompts=["a photo of a cat", "a red house"],
            seeds=[0, 1],
            settings=RenderSettings(steps=4, height=64, width=64),
            show_progress=False,
        )
        comparison.save(output, overwrite=True)
        output.with_suffix(".json").unlink()  # its record names this run's temporary folders
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "diffusion-grid.png"))
