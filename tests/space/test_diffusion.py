"""The Diffusion tab over HTTP with gradio_client: tiny pipelines on the loopback Hub fused with block weights, drawn
beside their inputs in one grid whose every column is what plain diffusers draws from the same seeds; the caps, the
methods and hostile pipeline names refused in the request."""

from __future__ import annotations

import sys
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from diffusion_models import make_sd_pool
from gradio_client import Client
from gradio_client.exceptions import AppError
from huggingface_hub import snapshot_download
from PIL import Image
from public_server import serve_public
from safetensors.torch import load_file

from hf_fusion.errors import RecipeError
from hf_fusion.fusion import as_recipe, validate_recipe
from hf_fusion.images.grid import grid_layout, row_label
from hf_fusion.images.render import picture_rows
from hf_fusion.space.block_presets import DOWN_MID_UP, preset_yaml
from hf_fusion.space.diffusion import RenderCaps, prepare_request

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "images"))

from image_helpers import render_plainly, same_pixels  # noqa: E402

SECRET = "SECRET-d1ff-do-not-serve"
WEIGHTS = "diffusion_pytorch_model.safetensors"


def publish_pipeline(hub, repo_id: str, folder: Path) -> None:
    """A pipeline folder (model_index.json and one subfolder per component) as a public repo."""
    hub.state.create(repo_id)
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    files["README.md"] = f"---\nlicense: openrail\n---\n# {repo_id}\n".encode()
    hub.state.upload(repo_id, files, title="upload pipeline")


@pytest.fixture(scope="module")
def sd_hub(hub, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A tiny SD 1.x base and two perturbed copies, as local folders and as repos on the loopback Hub."""
    base, experts = make_sd_pool(tmp_path_factory.mktemp("sd-pool"))
    tag = uuid.uuid4().hex[:6]
    names = [f"alice/sd-base-{tag}", *(f"alice/sd-ft{i}-{tag}" for i in range(len(experts)))]
    for name, folder in zip(names, [base, *experts]):
        publish_pipeline(hub, name, folder)
    return {"base": names[0], "experts": names[1:], "local": [base, *experts]}


def _recipe(**fields: object) -> str:
    return yaml.safe_dump(fields, sort_keys=False)


def _unzip(archive: str, into: Path) -> Path:
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(into)
        top = {n.split("/")[0] for n in zf.namelist()}
    assert len(top) == 1
    return into / top.pop()


def _block_factor(name: str) -> float:
    """The scaling factor the down / mid / up preset (0.2 .. 0.8, others 0.5) gives a UNet tensor."""
    for prefix, value in (("down_blocks.", 0.2), ("mid_block.", 0.5), ("up_blocks.", 0.8)):
        if name.startswith(prefix):
            return value
    return 0.5


def test_pipelines_fuse_then_draw_a_grid_of_plain_diffusers_pictures(
    client, sd_hub, tokens, repo_name: str, monkeypatch, tmp_path: Path
) -> None:
    base, experts = sd_hub["base"], sd_hub["experts"]
    local_base, *local_experts = sd_hub["local"]
    factors = yaml.safe_load(preset_yaml(DOWN_MID_UP, "scaling_factor", 0.2, 0.8, 0.5))["scaling_factor"]
    recipe = _recipe(
        method="task_arithmetic",
        models=experts,
        base=base,
        components=["unet", "text_encoder"],
        parameters={"scaling_factor": factors},
    )
    prompts, seeds = ["a photo of a cat", "red house"], [3]
    status, log, grid, archive, card = client.predict(
        recipe, "\n".join(prompts) + "\n\n", " 3 ", 2, 32, api_name="/merge_pipelines"
    )
    assert "Merged 2 pipeline(s) with **task_arithmetic**" in status and "2 row(s) x 4 columns" in status
    assert "drew 8 pictures" in log
    fused = _unzip(archive, tmp_path / "unzipped")
    assert (fused / "model_index.json").read_bytes() == (local_base / "model_index.json").read_bytes()

    # the weights: block-weighted task arithmetic on the UNet, 0.5 on the text encoder, the VAE copied
    for component, file, factor in (
        ("unet", WEIGHTS, _block_factor),
        ("text_encoder", "model.safetensors", lambda name: 0.5),
    ):
        merged = load_file(fused / component / file)
        start = load_file(local_base / component / file)
        tuned = [load_file(folder / component / file) for folder in local_experts]
        assert set(merged) == set(start)
        for name, value in start.items():
            expected = value.double() + factor(name) * sum(t[name].double() - value.double() for t in tuned)
            torch.testing.assert_close(merged[name].double(), expected, rtol=1e-5, atol=1e-6)
    assert (fused / "vae" / WEIGHTS).read_bytes() == (local_base / "vae" / WEIGHTS).read_bytes()

    # the grid: rows prompt x seed, columns base, each input, fused; each cell what plain diffusers draws
    rows = picture_rows(prompts, seeds)
    columns = [render_plainly(folder, rows) for folder in (local_base, *local_experts, fused)]
    labels = [base, *experts, "fused (task_arithmetic)"]
    layout = grid_layout(columns, labels, [row_label(p, s) for p, s in rows])
    picture = Image.open(grid)
    assert picture.format == "PNG" and picture.size == layout.size
    for c, column in enumerate(columns):
        for r, expected in enumerate(column):
            assert same_pixels(picture.crop(layout.cell(c, r)), expected), (labels[c], rows[r])
    assert not same_pixels(columns[-1][0], columns[0][0])  # the fused pipeline draws its own picture
    assert "task_arithmetic" in card

    # the fused pipeline pushes like any merge of the session
    monkeypatch.setenv("HF_TOKEN", tokens["write"])
    pushed = client.predict(repo_name, True, False, api_name="/push_pipeline")
    assert f"Pushed to [{repo_name}]" in pushed and "(private)" in pushed
    remote = Path(snapshot_download(repo_name, token=tokens["write"], cache_dir=tmp_path / "cache"))
    for path in (
        "model_index.json",
        f"unet/{WEIGHTS}",
        "text_encoder/model.safetensors",
        "scheduler/scheduler_config.json",
    ):
        assert (remote / path).read_bytes() == (fused / path).read_bytes(), path


@pytest.mark.parametrize(
    ("recipe", "prompts", "seeds", "size", "message"),
    [
        (_recipe(method="task_arithmetic", models=["a/b"], base="a/c"), "a\nb\nc\nd", "0", 32, "at most 3 per request"),
        (_recipe(method="task_arithmetic", models=["a/b"], base="a/c"), " \n\n", "0", 32, "at least one prompt"),
        (_recipe(method="task_arithmetic", models=["a/b"], base="a/c"), "a", "0 1 2", 32, "at most 2 per request"),
        (_recipe(method="task_arithmetic", models=["a/b"], base="a/c"), "a", "-1", 32, "not a whole number"),
        (_recipe(method="task_arithmetic", models=["a/b"], base="a/c"), "a", "0", 36, "multiple of 8"),
        (_recipe(method="regmean", models=["a/b", "a/d"]), "a", "0", 32, "does not fuse diffusers pipelines"),
        (_recipe(method="tall_masks", models=["a/b"], base="a/c"), "a", "0", 32, "does not fuse diffusers"),
        (_recipe(method="task_arithmetic", pool="minilm-text3"), "a", "0", 32, "not a pool's models"),
        (
            _recipe(method="task_arithmetic", models=["a/b", "a/d", "a/e", "a/f"], base="a/c"),
            "a",
            "0",
            32,
            "at most 3",
        ),
        (_recipe(method="task_arithmetic", models=["a/b"]), "a", "0", 32, "needs a base"),
    ],
)
def test_requests_beyond_the_caps_or_the_tab_are_refused_at_once(
    client, recipe: str, prompts: str, seeds: str, size: int, message: str
) -> None:
    with pytest.raises(AppError) as caught:
        client.predict(recipe, prompts, seeds, 2, size, api_name="/merge_pipelines")
    assert message.lower() in str(caught.value).lower()


def test_caps_hold_for_every_value() -> None:
    recipe = validate_recipe(as_recipe({"method": "task_arithmetic", "models": ["a/b"], "base": "a/c"}, {})).recipe
    caps = RenderCaps(prompts=2, seeds=1, steps=4, size=64)
    request = prepare_request(recipe, "one\n\ntwo", " 7 ", 4.0, 64, caps=caps, device="cpu")
    assert (request.prompts, request.seeds, request.rows, request.columns) == (["one", "two"], [7], 2, 3)
    assert (request.settings.steps, request.settings.height, request.settings.width) == (4, 64, 64)
    for steps, size, message in (
        (5, 64, "steps"),
        (0, 64, "steps"),
        (2.5, 64, "steps"),
        (4, 72, "size"),
        (4, 16, "size"),
    ):
        with pytest.raises(RecipeError, match=message):
            prepare_request(recipe, "one", "0", steps, size, caps=caps, device="cpu")
    for seeds in ("²", "1.5", "2" * 21, "0x1"):
        with pytest.raises(RecipeError, match="not a whole number"):
            prepare_request(recipe, "one", seeds, 2, 64, caps=caps, device="cpu")
    with pytest.raises(RecipeError, match="longer than 200"):
        prepare_request(recipe, "x" * 201, "0", 2, 64, caps=caps, device="cpu")
    assert "up to 2 prompts" in caps.summary() and "64x64 pixels" in caps.summary()


@pytest.fixture(scope="module")
def public_space(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    from hf_fusion.space import SpaceLimits

    cache, sessions = tmp_path_factory.mktemp("gradio-cache"), tmp_path_factory.mktemp("sessions")
    with serve_public(sessions, cache, SpaceLimits(running=1, waiting=2, idle_seconds=600, disk_budget=10**10)) as url:
        yield url, sessions, cache


def test_a_visitor_cannot_name_a_pipeline_on_the_servers_disk(public_space, sd_hub, tmp_path_factory) -> None:
    url, sessions, cache = public_space
    private = tmp_path_factory.mktemp("server-private") / "pipeline"
    private.mkdir()
    (private / "model_index.json").write_text(f'{{"_class_name": "{SECRET}"}}')
    local_base = sd_hub["local"][0]
    client = Client(url, verbose=False, analytics_enabled=False, download_files=False)
    hostile = [
        _recipe(method="task_arithmetic", models=[sd_hub["experts"][0]], base=str(local_base)),
        _recipe(method="task_arithmetic", models=[str(private)], base=sd_hub["base"]),
        _recipe(method="task_arithmetic", models=[{"path": str(private)}], base=sd_hub["base"]),
        _recipe(method="task_arithmetic", models=["~/.cache/huggingface"], base=sd_hub["base"]),
        _recipe(method="task_arithmetic", models=[f"builtin:{private}"], base=sd_hub["base"]),
    ]
    for recipe in hostile:
        with pytest.raises(AppError) as caught:
            client.predict(recipe, "a photo of a cat", "0", 2, 32, api_name="/merge_pipelines")
        text = str(caught.value)
        assert "cannot be used on this Space" in text or "not a built-in model" in text, text
        assert SECRET not in text
    assert [p for folder in (sessions, cache / "hf-fusion") for p in folder.rglob("*")] == []


def test_an_input_that_is_not_a_pipeline_is_refused_before_the_merge(client, sd_hub, hub, space_root: Path) -> None:
    lora = f"alice/not-a-pipeline-{uuid.uuid4().hex[:6]}"
    hub.state.create(lora)
    hub.state.upload(lora, {"pytorch_lora_weights.safetensors": b"{}", "README.md": b"# a LoRA"}, title="upload")
    recipe = _recipe(method="task_arithmetic", models=[lora], base=sd_hub["base"])
    before = sorted(space_root.rglob("*"))
    with pytest.raises(AppError, match=rf"{lora} is not a diffusers pipeline.*Merge tab"):
        client.predict(recipe, "a photo of a cat", "0", 2, 32, api_name="/merge_pipelines")
    assert sorted(space_root.rglob("*")) == before  # no folder, no grid: the merge never started
