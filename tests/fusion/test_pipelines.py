"""Diffusers pipelines through the one fusion path: each component fused by the engine, the rest copied, a folder
``DiffusionPipeline.from_pretrained`` loads, from local folders and from the (loopback) Hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusion_models import generate, make_sd_pool
from huggingface_hub import ModelCard, snapshot_download
from safetensors.torch import load_file

import hf_fusion
from hf_fusion.errors import IncompatibleModelsError, RecipeError

WEIGHTS = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors"}


def weights(folder: Path, component: str) -> dict[str, torch.Tensor]:
    return load_file(folder / component / WEIGHTS.get(component, "model.safetensors"))


@pytest.fixture(scope="module")
def sd_pool(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return make_sd_pool(tmp_path_factory.mktemp("sd"), experts=2)


@pytest.fixture(scope="module")
def sdxl_pool(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return make_sd_pool(tmp_path_factory.mktemp("sdxl"), experts=2, xl=True)


def block_scale(component: str, name: str) -> float:
    """The per-tensor scaling factor of the block-weighted recipe below, decided independently of hf-fusion."""
    if component == "unet" and "down_blocks" in name:
        return 0.2
    if component == "unet" and "up_blocks" in name:
        return 0.6
    if component.startswith("text_encoder"):
        return 0.5
    return 1.0


BLOCK_WEIGHTS = [
    {"filter": "unet.down_blocks", "value": 0.2},  # filters see component.tensor: the VAE has up_blocks too
    {"filter": "unet.up_blocks", "value": 0.6},
    {"filter": "text_encoder.", "value": 0.5},
    {"value": 1.0},
]


def test_block_weighted_task_arithmetic_equals_an_independent_computation(
    sd_pool: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    base, experts = sd_pool
    out = tmp_path / "merged"
    result = hf_fusion.merge(
        models=[str(e) for e in experts],
        base=str(base),
        method="task_arithmetic",
        scaling_factor=BLOCK_WEIGHTS,
        output=out,
        show_progress=False,
    )
    assert result.fused_tensors > 0
    expected: dict[str, dict[str, torch.Tensor]] = {}
    for component in ("unet", "text_encoder", "vae"):
        b = weights(base, component)
        es = [weights(e, component) for e in experts]
        got = weights(out, component)
        assert set(got) == set(b)
        expected[component] = {}
        for name, value in b.items():
            want = value + block_scale(component, name) * sum(e[name] - value for e in es)
            expected[component][name] = want
            torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6, msg=f"{component}/{name}")
    # scheduler, tokenizer and index come from the base, byte for byte
    for name in ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes()

    # the folder loads and draws what a pipeline built from the independently computed weights draws
    from diffusers import DiffusionPipeline

    reference = DiffusionPipeline.from_pretrained(base)
    for component, state in expected.items():
        getattr(reference, component).load_state_dict(state, strict=False)
    reference.save_pretrained(tmp_path / "reference")
    torch.testing.assert_close(generate(out), generate(tmp_path / "reference"), rtol=0, atol=1e-5)
    assert not torch.equal(generate(out), generate(base))


def test_a_block_gradient_gives_each_unet_block_its_value(sd_pool: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """The tiny UNet has 9 blocks (IN00-IN03, M00, OUT00-OUT03): nine values, one per block, on the UNet only."""
    from hf_fusion.engine.blocks import unet_blocks

    base, experts = sd_pool
    values = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    hf_fusion.merge(
        models=[str(e) for e in experts],
        base=str(base),
        method="task_arithmetic",
        scaling_factor=[{"filter": "unet.", "value": values}, {"value": 0.0}],
        output=tmp_path / "mbw",
        show_progress=False,
    )
    b = weights(base, "unet")
    es = [weights(e, "unet") for e in experts]
    got = weights(tmp_path / "mbw", "unet")
    blocks = unet_blocks(list(b))
    assert sorted(set(blocks.values())) == list(range(9))
    for name, value in b.items():
        want = value + values[blocks[name]] * sum(e[name] - value for e in es)
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6, msg=name)
    assert (tmp_path / "mbw/text_encoder/model.safetensors").is_file()
    torch.testing.assert_close(weights(tmp_path / "mbw", "text_encoder"), weights(base, "text_encoder"))


def test_components_limits_what_is_fused_and_copies_the_rest_from_the_base(
    sd_pool: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    base, experts = sd_pool
    out = tmp_path / "unet-only"
    hf_fusion.merge(
        models=[str(e) for e in experts],
        base=str(base),
        method="weighted_average",
        weights=[0.25, 0.75],
        components=["unet"],
        output=out,
        show_progress=False,
    )
    a, b = (weights(e, "unet") for e in experts)
    got = weights(out, "unet")
    for name in got:
        torch.testing.assert_close(got[name], 0.25 * a[name] + 0.75 * b[name], rtol=0, atol=1e-6)
    for part in ("text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        assert (out / part).read_bytes() == (base / part).read_bytes()
    recipe = (out / "fusion_recipe.yaml").read_text()
    assert "components:\n- unet\n" in recipe
    card = (out / "README.md").read_text()
    assert "--components unet" in card and 'the "unet" component is fused' in card
    assert "comparison.png" not in card
    # a comparison grid written into the folder is shown by the card written again
    from PIL import Image

    from hf_fusion.cards import write_card

    Image.new("RGB", (8, 8)).save(out / "comparison.png")
    write_card(out)
    assert "![The same prompts and seeds through each model](./comparison.png)" in (out / "README.md").read_text()


def test_add_difference_is_task_arithmetic_with_per_model_weights(
    sd_pool: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    """A + alpha * (B - C), the checkpoint mergers' add-difference: C is the base, A and B the models, weights 1 and
    alpha, scaling factor 1."""
    base, (a_dir, b_dir) = sd_pool
    hf_fusion.merge(
        models=[str(a_dir), str(b_dir)],
        base=str(base),
        method="add_difference",
        weights=[1.0, 0.7],
        scaling_factor=1.0,
        components=["unet"],
        output=tmp_path / "ad",
        show_progress=False,
    )
    a, b, c = (weights(f, "unet") for f in (a_dir, b_dir, base))
    got = weights(tmp_path / "ad", "unet")
    for name in got:
        torch.testing.assert_close(got[name], a[name] + 0.7 * (b[name] - c[name]), rtol=0, atol=1e-6)


def test_sdxl_two_text_encoders_fused_without_a_base(sdxl_pool: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, experts = sdxl_pool
    out = tmp_path / "xl"
    hf_fusion.merge(models=[str(e) for e in experts], method="simple_average", output=out, show_progress=False)
    for component in ("unet", "text_encoder", "text_encoder_2", "vae"):
        a, b = (weights(e, component) for e in experts)
        got = weights(out, component)
        for name in got:
            torch.testing.assert_close(got[name], (a[name] + b[name]) / 2, rtol=0, atol=1e-6)
    # without a base, the parts that are not fused come from the first model
    assert (out / "tokenizer_2/tokenizer.json").read_bytes() == (experts[0] / "tokenizer_2/tokenizer.json").read_bytes()
    assert generate(out).shape == (1, 3, 32, 32)


def test_fp16_variant_files_are_read_and_written_as_plain_weights(
    sd_pool: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    from diffusers import DiffusionPipeline

    base, experts = sd_pool
    variants = []
    for i, expert in enumerate(experts):
        pipe = DiffusionPipeline.from_pretrained(expert, dtype=torch.float16)
        pipe.save_pretrained(tmp_path / f"fp16-{i}", variant="fp16")
        variants.append(tmp_path / f"fp16-{i}")
    assert (variants[0] / "unet/diffusion_pytorch_model.fp16.safetensors").is_file()
    out = tmp_path / "out"
    hf_fusion.merge(models=[str(v) for v in variants], method="simple_average", output=out, show_progress=False)
    got = load_file(out / "unet/diffusion_pytorch_model.safetensors")
    a, b = (load_file(v / "unet/diffusion_pytorch_model.fp16.safetensors") for v in variants)
    name = next(iter(got))
    assert got[name].dtype == torch.float16
    torch.testing.assert_close(got[name], ((a[name].float() + b[name].float()) / 2).half(), rtol=0, atol=1e-3)
    assert DiffusionPipeline.from_pretrained(out) is not None


def test_bad_pipelines_are_refused_before_anything_is_written(
    sd_pool: tuple[Path, list[Path]], sdxl_pool: tuple[Path, list[Path]], bert_pool, tmp_path: Path
) -> None:
    import shutil

    base, experts = sd_pool
    out = tmp_path / "out"

    def refused(error: type[Exception], match: str, **kwargs) -> None:
        with pytest.raises(error, match=match):
            hf_fusion.merge(output=out, show_progress=False, **kwargs)
        assert not out.exists()

    refused(
        IncompatibleModelsError,
        "StableDiffusionXLPipeline but .* StableDiffusionPipeline",
        models=[str(experts[0]), str(sdxl_pool[1][0])],
        base=str(base),
        method="task_arithmetic",
    )
    lacking = tmp_path / "no-vae"
    shutil.copytree(experts[1], lacking)
    shutil.rmtree(lacking / "vae")
    refused(
        IncompatibleModelsError,
        "no-vae has no 'vae' component",
        models=[str(experts[0]), str(lacking)],
        base=str(base),
        method="task_arithmetic",
    )
    refused(
        RecipeError,
        "has no weight component 'transformer'",
        models=[str(e) for e in experts],
        base=str(base),
        method="task_arithmetic",
        components=["transformer"],
    )
    refused(
        RecipeError,
        "neither a diffusers pipeline .* a LoRA for the base, nor a single-file checkpoint",
        models=[str(experts[0]), str(bert_pool[0])],
        base=str(base),
        method="task_arithmetic",
    )
    refused(
        RecipeError,
        "diffusers pipelines take the data-free",
        models=[str(e) for e in experts],
        base=str(base),
        method="simple_ensemble",
    )
    refused(
        RecipeError,
        "tokenizer applies to transformers models",
        models=[str(e) for e in experts],
        base=str(base),
        method="task_arithmetic",
        tokenizer="union",
    )


def _publish_pipeline(hub, repo_id: str, folder: Path) -> str:
    hub.state.create(repo_id)
    files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    files["README.md"] = f"---\nlicense: openrail\n---\n# {repo_id}\n".encode()
    return hub.state.upload(repo_id, files, title="upload pipeline")


@pytest.mark.slow
def test_hub_pipelines_merge_push_and_download_byte_for_byte(
    hub, tokens, sd_pool: tuple[Path, list[Path]], repo_name: str, tmp_path: Path
) -> None:
    base, experts = sd_pool
    names = {"base": f"alice/sd-base-{repo_name[-6:]}"} | {
        f"e{i}": f"alice/sd-expert-{i}-{repo_name[-6:]}" for i in range(2)
    }
    commits = {name: _publish_pipeline(hub, name, folder) for name, folder in zip(names.values(), [base, *experts])}
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"} | {"HF_TOKEN": tokens["write"]}
    command = [
        sys.executable,
        "-m",
        "hf_fusion",
        "merge",
        "--repo-ids",
        names["e0"],
        names["e1"],
        "--base",
        names["base"],
        "--method",
        "task_arithmetic",
        "--param-for",
        "down_blocks",
        "scaling_factor=0.2",
        "--param-for",
        "up_blocks",
        "scaling_factor=0.6",
        "--output",
        str(tmp_path / "merged"),
        "--push",
        repo_name,
    ]
    out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    local = {
        str(p.relative_to(tmp_path / "merged")): p.read_bytes() for p in (tmp_path / "merged").rglob("*") if p.is_file()
    }
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"} <= set(
        local
    )
    downloaded = Path(snapshot_download(repo_name, cache_dir=tmp_path / "fresh"))
    again = {str(p.relative_to(downloaded)): p.read_bytes() for p in downloaded.rglob("*") if p.is_file()}
    assert {k: v for k, v in again.items() if not k.startswith(".")} == local

    card = ModelCard.load(repo_name)
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "text-to-image"
    assert data["base_model"] == [names["base"], names["e0"], names["e1"]]
    assert data["base_model_relation"] == "merge" and data["license"] == "openrail"
    for name, commit in commits.items():
        assert f"{name}@{commit}" in card.text
    assert tokens["write"] not in out.stdout + out.stderr + card.text

    # the card's usage snippet runs as written, on diffusers alone
    code = card.text.split("```python\n", 1)[1].split("```", 1)[0]
    run = subprocess.run(
        [sys.executable, "-c", code.replace('"cat.png"', json.dumps(str(tmp_path / "cat.png")))],
        capture_output=True,
        text=True,
        env={**env, "HF_HUB_OFFLINE": "0"},
        cwd=tmp_path,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "cat.png").is_file()


def _peft_lora(base: Path, folder: Path, seed: int, *, xl: bool = False) -> Path:
    """A LoRA for the UNet (attention and a convolution) and the text encoder(s), saved as diffusers saves
    trained LoRAs (peft keys with their adapter metadata, so alpha 8 over rank 4 counts)."""
    from diffusers import DiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = DiffusionPipeline.from_pretrained(base)
    torch.manual_seed(seed)
    options = {"r": 4, "lora_alpha": 8, "init_lora_weights": False}
    pipe.unet.add_adapter(LoraConfig(target_modules=["to_q", "to_v", "conv1"], **options))
    pipe.text_encoder.add_adapter(LoraConfig(target_modules=["q_proj", "fc1"], **options))
    type(pipe).save_lora_weights(
        folder,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default"].to_dict(),
    )
    return folder


def _fused_by_diffusers(base: Path, lora: Path) -> dict[str, dict[str, torch.Tensor]]:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(base)
    pipe.load_lora_weights(str(lora), weight_name="pytorch_lora_weights.safetensors")
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0)
    pipe.unload_lora_weights()
    return {name: getattr(pipe, name).state_dict() for name in ("unet", "text_encoder")}


def test_loras_fused_into_the_base_equal_diffusers_fuse_lora(
    sd_pool: tuple[Path, list[Path]], sdxl_pool: tuple[Path, list[Path]], tmp_path: Path, monkeypatch
) -> None:
    import transformers.integrations.peft as transformers_peft

    # diffusers' text-encoder LoRA loading goes through transformers' adapter API, which asks for a newer peft
    # than the registry has; the calls it makes work with the installed one (for the reference side only)
    monkeypatch.setattr(transformers_peft, "check_peft_version", lambda min_version: None)
    base = sd_pool[0]
    loras = [_peft_lora(base, tmp_path / f"lora-{i}", seed=10 + i) for i in range(2)]
    out = tmp_path / "with-loras"
    result = hf_fusion.merge(
        models=[str(f) for f in loras],
        base=str(base),
        method="task_arithmetic",
        scaling_factor=0.5,
        output=out,
        show_progress=False,
    )
    assert result.recipe.components is None
    dense = [_fused_by_diffusers(base, f) for f in loras]
    for component in ("unet", "text_encoder"):
        b = weights(base, component)
        got = weights(out, component)
        for name, value in b.items():
            want = value + 0.5 * sum(d[component][name] - value for d in dense)
            torch.testing.assert_close(got[name], want, rtol=1e-5, atol=1e-6, msg=f"{component}/{name}")
    # the VAE no LoRA touches is the base's, byte for byte
    assert (out / "vae/diffusion_pytorch_model.safetensors").read_bytes() == (
        base / "vae/diffusion_pytorch_model.safetensors"
    ).read_bytes()
    assert generate(out).shape == (1, 3, 32, 32)

    # a LoRA made for another base (SDXL-shaped) is refused before anything is written
    xl_lora = _peft_lora(sdxl_pool[0], tmp_path / "xl-lora", seed=3, xl=True)
    with pytest.raises(Exception, match="LoRA"):
        hf_fusion.merge(
            models=[str(loras[0]), str(xl_lora)],
            base=str(base),
            method="task_arithmetic",
            output=tmp_path / "refused",
            show_progress=False,
        )
    assert not (tmp_path / "refused").exists()


def test_single_file_checkpoints_convert_once_and_fuse_like_their_pipeline(
    sd_pool: tuple[Path, list[Path]], sdxl_pool: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    from diffusion_models import to_single_file
    from huggingface_hub import constants

    from hf_fusion.errors import CheckpointError

    base, experts = sd_pool
    single = to_single_file(experts[0], tmp_path / "expert-0.safetensors")
    kwargs = {"base": str(base), "method": "task_arithmetic", "scaling_factor": 0.4, "show_progress": False}
    hf_fusion.merge(models=[str(single), str(experts[1])], output=tmp_path / "from-file", **kwargs)
    hf_fusion.merge(models=[str(e) for e in experts], output=tmp_path / "from-folders", **kwargs)
    for part in (
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ):
        assert (tmp_path / "from-file" / part).read_bytes() == (tmp_path / "from-folders" / part).read_bytes(), part
    assert f"- {single}\n" in (tmp_path / "from-file/fusion_recipe.yaml").read_text()
    cache = Path(constants.HF_HOME) / "hf-fusion" / "single-file"
    converted = sorted(cache.iterdir())
    hf_fusion.merge(models=[str(single), str(experts[1])], output=tmp_path / "again", **kwargs)
    assert sorted(cache.iterdir()) == converted  # converted once, found again

    def refused(error: type[Exception], match: str, models: list[str], **options) -> None:
        out = tmp_path / "refused"
        with pytest.raises(error, match=match):
            settings = {k: v for k, v in {**kwargs, **options}.items() if v is not None}
            hf_fusion.merge(models=models, output=out, **settings)
        assert not out.exists()

    from safetensors.torch import save_file

    save_file({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "other.safetensors")
    refused(CheckpointError, "unknown layout", [str(tmp_path / "other.safetensors"), str(experts[1])])
    refused(
        IncompatibleModelsError,
        "single-file 'v1' checkpoint, which does not fit the StableDiffusionXLPipeline",
        [str(single), str(sdxl_pool[1][0])],
        base=str(sdxl_pool[0]),
    )
    refused(
        RecipeError,
        "need the pipeline they belong to as --base",
        [str(experts[1]), str(single)],
        base=None,
        method="simple_average",
        scaling_factor=None,
    )


def test_hub_single_file_and_lora_repos_are_typed_from_their_headers(
    hub, sd_pool: tuple[Path, list[Path]], repo_name: str, tmp_path: Path
) -> None:
    from diffusion_models import to_single_file

    base, experts = sd_pool
    single = to_single_file(experts[0], tmp_path / "model.safetensors")
    repo = f"alice/single-{repo_name[-6:]}"
    hub.state.create(repo)
    commit = hub.state.upload(repo, {"sd-style.safetensors": single.read_bytes()})
    out = tmp_path / "out"
    hf_fusion.merge(
        models=[repo, str(experts[1])], base=str(base), method="simple_average", output=out, show_progress=False
    )
    hf_fusion.merge(
        models=[str(e) for e in experts],
        base=str(base),
        method="simple_average",
        output=tmp_path / "ref",
        show_progress=False,
    )
    part = "unet/diffusion_pytorch_model.safetensors"
    assert (out / part).read_bytes() == (tmp_path / "ref" / part).read_bytes()
    assert commit in (out / "fusion_recipe.yaml").read_text()  # pinned like any Hub input

    # offline, the cached file is found again and pinned to the same commit
    offline = subprocess.run(
        [
            sys.executable,
            "-m",
            "hf_fusion",
            "merge",
            "--quiet",
            "--repo-ids",
            repo,
            str(experts[1]),
            "--base",
            str(base),
            "--method",
            "simple_average",
            "--output",
            str(tmp_path / "offline"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert offline.returncode == 0, offline.stderr
    assert (tmp_path / "offline" / part).read_bytes() == (out / part).read_bytes()
    assert commit in (tmp_path / "offline" / "fusion_recipe.yaml").read_text()


def test_copied_variant_components_load_and_bad_references_are_refused(
    sd_pool: tuple[Path, list[Path]], bert_pool, tmp_path: Path
) -> None:
    """Components taken whole from an fp16-only reference are written under plain names (the output loads without
    ``variant=``); a reference missing a part its index names is refused before anything is written; components
    and excludes follow the component.tensor naming."""
    import shutil

    from diffusers import DiffusionPipeline

    base, experts = sd_pool
    variants = []
    for i, folder in enumerate([base, *experts]):
        pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float16)
        pipe.save_pretrained(tmp_path / f"fp16-{i}", variant="fp16")
        variants.append(tmp_path / f"fp16-{i}")
    out = tmp_path / "unet-only"
    hf_fusion.merge(
        models=[str(v) for v in variants[1:]],
        base=str(variants[0]),
        method="task_arithmetic",
        components=["unet"],
        exclude=["unet.conv_in.*"],
        output=out,
        show_progress=False,
    )
    assert (out / "vae/diffusion_pytorch_model.safetensors").read_bytes() == (
        variants[0] / "vae/diffusion_pytorch_model.fp16.safetensors"
    ).read_bytes()
    assert not list(out.rglob("*.fp16.*"))
    got, b = weights(out, "unet"), load_file(variants[0] / "unet/diffusion_pytorch_model.fp16.safetensors")
    assert torch.equal(got["conv_in.weight"], b["conv_in.weight"])  # excluded: the base's
    assert not torch.equal(got["conv_out.weight"], b["conv_out.weight"])
    assert got["conv_out.weight"].dtype == torch.float16
    assert DiffusionPipeline.from_pretrained(out).vae is not None  # loads without variant=

    broken = tmp_path / "no-scheduler"
    shutil.copytree(base, broken)
    shutil.rmtree(broken / "scheduler")
    with pytest.raises(Exception, match="names 'scheduler', but it has no scheduler/ folder"):
        hf_fusion.merge(
            models=[str(e) for e in experts],
            base=str(broken),
            method="task_arithmetic",
            output=tmp_path / "o1",
            show_progress=False,
        )
    assert not (tmp_path / "o1").exists()
    with pytest.raises(RecipeError, match="components applies to diffusers pipelines"):
        hf_fusion.merge(
            models=[str(p) for p in bert_pool[1][:2]],
            method="simple_average",
            components=["unet"],
            output=tmp_path / "o2",
            show_progress=False,
        )
    assert not (tmp_path / "o2").exists()


def test_single_file_conversions_are_kept_per_base_and_refused_when_turned_off(
    sd_pool: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    import json as jsonlib
    import shutil

    from diffusion_models import to_single_file
    from huggingface_hub import constants

    base, experts = sd_pool
    single = to_single_file(experts[0], tmp_path / "expert-0.safetensors")
    other_base = tmp_path / "other-base"
    shutil.copytree(base, other_base)
    config = jsonlib.loads((other_base / "scheduler/scheduler_config.json").read_text())
    (other_base / "scheduler/scheduler_config.json").write_text(jsonlib.dumps({**config, "steps_offset": 0}))
    cache = Path(constants.HF_HOME) / "hf-fusion" / "single-file"
    before = set(cache.iterdir()) if cache.exists() else set()
    for i, b in enumerate([base, other_base]):
        hf_fusion.merge(
            models=[str(single), str(experts[1])],
            base=str(b),
            method="simple_average",
            output=tmp_path / f"o{i}",
            show_progress=False,
        )
    assert len(set(cache.iterdir()) - before) == 2  # one conversion per base: each completes it with its own parts
    with pytest.raises(RecipeError, match="does not convert"):
        hf_fusion.merge(
            models=[str(single), str(experts[1])],
            base=str(base),
            method="simple_average",
            output=tmp_path / "refused",
            show_progress=False,
            convert_single_files=False,
        )
    assert not (tmp_path / "refused").exists()


def test_flux_transformer_block_gradient_and_components(tmp_path: Path) -> None:
    """A Flux-shaped pipeline (one double and one single block, a CLIP text encoder): a gradient of two values gives
    the double-stream block (and the embedders) the first and the single-stream block (and the output layers) the
    second; the text encoder takes the catch-all value."""
    from diffusers import DiffusionPipeline
    from diffusion_models import flux_pipeline, perturbed

    folders = []
    for i in range(3):
        pipe = flux_pipeline(0, tmp_path)
        if i:
            perturbed(pipe, seed=200 + i)
        pipe.save_pretrained(tmp_path / f"flux-{i}")
        folders.append(tmp_path / f"flux-{i}")
    out = tmp_path / "out"
    hf_fusion.merge(
        models=[str(f) for f in folders[1:]],
        base=str(folders[0]),
        method="task_arithmetic",
        scaling_factor=[{"filter": "transformer.", "value": [0.25, 0.75]}, {"value": 0.5}],
        output=out,
        show_progress=False,
    )

    def scale(component: str, name: str) -> float:
        if component == "text_encoder":
            return 0.5
        late = name.startswith(("single_transformer_blocks.", "norm_out.", "proj_out."))
        return 0.75 if late else 0.25

    for component, file in (
        ("transformer", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ):
        b = load_file(folders[0] / component / file)
        es = [load_file(f / component / file) for f in folders[1:]]
        got = load_file(out / component / file)
        for name, value in b.items():
            want = value + scale(component, name) * sum(e[name] - value for e in es)
            torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6, msg=f"{component}/{name}")
    # the reduced pipeline has no VAE, T5 or scheduler: diffusers loads it when told they are absent
    absent = dict.fromkeys(["scheduler", "vae", "text_encoder_2", "tokenizer_2"])
    assert type(DiffusionPipeline.from_pretrained(out, **absent)).__name__ == "FluxPipeline"


def test_variant_picks_the_fp16_files_of_folders_that_hold_both(
    sd_pool: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    from diffusers import DiffusionPipeline

    base, experts = sd_pool
    both = []
    for i, folder in enumerate([base, *experts]):
        shutil_copy = tmp_path / f"both-{i}"
        pipe = DiffusionPipeline.from_pretrained(folder)
        pipe.save_pretrained(shutil_copy)
        pipe.to(torch.float16).save_pretrained(shutil_copy, variant="fp16")
        both.append(shutil_copy)
    out = tmp_path / "fp16"
    hf_fusion.merge(
        models=[str(f) for f in both[1:]],
        base=str(both[0]),
        method="task_arithmetic",
        components=["unet"],
        variant="fp16",
        output=out,
        show_progress=False,
    )
    fp16 = [load_file(f / "unet/diffusion_pytorch_model.fp16.safetensors") for f in both]
    got = weights(out, "unet")
    name = "conv_in.weight"
    assert got[name].dtype == torch.float16
    want = fp16[0][name].float() + 0.3 * sum(e[name].float() - fp16[0][name].float() for e in fp16[1:])
    torch.testing.assert_close(got[name].float(), want, rtol=0, atol=2e-3)
    assert (out / "vae/diffusion_pytorch_model.safetensors").read_bytes() == (
        both[0] / "vae/diffusion_pytorch_model.fp16.safetensors"
    ).read_bytes()
    assert "--variant fp16" in (out / "README.md").read_text()
    plain = tmp_path / "plain"
    hf_fusion.merge(
        models=[str(f) for f in both[1:]],
        base=str(both[0]),
        method="task_arithmetic",
        components=["unet"],
        output=plain,
        show_progress=False,
    )
    assert weights(plain, "unet")[name].dtype == torch.float32
    with pytest.raises(RecipeError, match="variant"):  # a variant is a file-name part, never a path
        hf_fusion.merge(
            models=[str(f) for f in both[1:]],
            base=str(both[0]),
            method="task_arithmetic",
            variant="../fp16",
            output=tmp_path / "refused",
            show_progress=False,
        )
    assert not (tmp_path / "refused").exists()
