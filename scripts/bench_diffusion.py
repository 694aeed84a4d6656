#!/usr/bin/env python
"""Benchmark `hf-fusion merge` on Stable Diffusion 1.5-shaped pipelines against sd-mecha, diffusers' community
`checkpoint_merger` pipeline and the I/O floor, in one run.

Workload (generated once, cached in bench_workload/sd15, or bench_workload/sd15-tiny with --scale tiny): a base and 3
"fine-tunes" (base + N(0, NOISE^2) on every weight), fp16, random weights, each a diffusers pipeline folder written
with `save_pretrained`: UNet2DConditionModel with SD 1.5's config (860M parameters), a CLIPTextModel with ViT-L/14's
text config (123M), AutoencoderKL with SD's config (84M), a PNDM scheduler and a small CLIP tokenizer (its vocabulary
is not CLIP's; nothing here tokenises). Each model is about 2.1 GB. --scale tiny keeps SD 1.5's block structure (four
UNet levels of two layers with the same width steps, 12 text layers, four VAE levels) at test-model widths: the same
1130 tensor names, so every key mapping is exercised.

sd-mecha has no diffusers-pipeline layout for SD 1.x: it reads single safetensors files in one of its model configs,
`sd1-ldm` (the original single-file LDM / A1111 keys: model.diffusion_model.*, cond_stage_model.transformer.*,
first_stage_model.*) or `sd1-kohya` (diffusers' key names behind te./unet./vae. prefixes). Merges are run in sd1-ldm,
the layout its users' checkpoints have: each workload model is also written as an sd1-ldm file (untimed), with the key
mapping of sd-mecha's own `sd1-kohya` -> `sd1-ldm` conversion (applied directly: that conversion fails as a merge
method in sd-mecha 1.1.8, see SD_MECHA_TO_LDM). sd-mecha's outputs are turned back into diffusers' layout for
the comparison by diffusers' own single-file converters (`diffusers.loaders.single_file_utils`), which are independent
of sd-mecha's mapping: a wrong mapping on either side shows as a large difference.

Tasks (weights sum to 1, so weighted sums need no normalisation):
  weighted_sum_2   0.3 ft0 + 0.7 ft1
  weighted_sum_3   0.2 ft0 + 0.3 ft1 + 0.5 ft2
  add_difference   ft0 + 0.7 (ft1 - base)
Tools, each run in a fresh process (wall time includes interpreter start and imports; peak RSS is the child's own
maximum resident set, from wait4), page cache warmed with the run's inputs first:
  io floor           read every input weight byte once, write one pipeline's weight bytes (no torch)
  hf-fusion          the CLI: weighted_average (normalize=false) / add_difference (task arithmetic, scaling 1), fp16
  sd-mecha           its Python API, chained weighted_sum / add_difference, fp16 output, default threads, cpu
  checkpoint_merger  CheckpointMergerPipeline.merge (whole pipelines, torch_dtype=float16, so it computes in fp16)
                     with interp None (weighted sum, 2 models only) or "add_diff" (3 models); then save_pretrained
hf-fusion also runs weighted_sum over 4 models (base + 3 fine-tunes) so its peak memory per model count can be read.
Each output is compared tensor by tensor with hf-fusion's: the largest absolute difference and the share of elements
that differ by more than one fp16 ulp.

Peers:
  python -m venv .bench/sd-mecha && .bench/sd-mecha/bin/pip install -c constraints.txt torch==2.13.0 sd-mecha
  checkpoint_merger.py is not in the diffusers wheel: pass the file from diffusers' repository
  (examples/community/checkpoint_merger.py) with --checkpoint-merger; it runs in this venv, with its diffusers.

Usage:
  python scripts/bench_diffusion.py --sd-mecha-python .bench/sd-mecha/bin/python \\
      --checkpoint-merger .bench/checkpoint_merger.py --markdown bench_results/diffusion.md \\
      --json bench_results/diffusion.json
  python scripts/bench_diffusion.py --scale tiny ...     (a smoke test of the whole run, a few minutes)
  python scripts/bench_diffusion.py make FOLDER --scale full --models 1   (the workload only)
Full scale: the workload (4 pipelines, 8.5 GB, plus 8.5 GB of sd1-ldm files) is written once, in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import IO_FLOOR, Measurement, measure, write_report  # noqa: E402

SEED = 0
NOISE = 2e-3
"""Standard deviation of the noise that makes a fine-tune from the base."""
SLICE = 1 << 20
"""Elements compared per step."""
DEFAULT_SD_MECHA_PYTHON = Path(".bench/sd-mecha/bin/python")
COMPONENT_FILES = {
    "unet": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
}

TASKS: dict[str, dict] = {
    "weighted_sum_2": {"models": ["ft0", "ft1"], "weights": [0.3, 0.7]},
    "weighted_sum_3": {"models": ["ft0", "ft1", "ft2"], "weights": [0.2, 0.3, 0.5]},
    "add_difference": {"models": ["ft0", "ft1", "base"], "alpha": 0.7},  # a + alpha (b - c)
}
SCALING_TASK = "weighted_sum_4"
SCALING_MODELS = ["base", "ft0", "ft1", "ft2"]


# --- workload -------------------------------------------------------------------------------------------------------


def _configs(scale: str) -> tuple[dict, dict, dict]:
    """UNet, CLIP text and VAE configs: SD 1.5's (full) or the same block structure at test-model widths (tiny)."""
    unet = dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    text = dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    vae = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
    )
    if scale == "tiny":
        unet |= dict(
            sample_size=16,
            block_out_channels=(8, 16, 32, 32),
            cross_attention_dim=16,
            attention_head_dim=2,
            norm_num_groups=4,
        )
        text |= dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_attention_heads=2, projection_dim=16)
        vae |= dict(block_out_channels=(8, 16, 32, 32), norm_num_groups=4, sample_size=32)
    return unet, text, vae


def _tokenizer(folder: Path):  # noqa: ANN202
    """A CLIP BPE tokenizer over a few whole words (each one token), written from vocab and merges."""
    from transformers import CLIPTokenizer

    words = ["a", "photo", "of", "cat", "dog"]
    folder.mkdir(parents=True, exist_ok=True)
    letters = sorted({c for w in words for c in w})
    tokens, merges = [*letters, *[c + "</w>" for c in letters]], []
    for word in words:
        current = word[0]
        for i, char in enumerate(word[1:], start=1):
            nxt = char + "</w>" if i == len(word) - 1 else char
            merges.append(f"{current} {nxt}")
            current += nxt
            tokens.append(current)
    vocab = {t: i for i, t in enumerate(dict.fromkeys([*tokens, "<|startoftext|>", "<|endoftext|>"]))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _random_fp16(module, generator) -> None:  # noqa: ANN001
    """Fills a module built on the meta device and then allocated empty (fp16): weights N(0, 1/fan_in), norm scales
    1, other vectors and buffers 0. Allocating fp16 directly keeps the UNet at 1.7 GB instead of 3.4 GB in fp32."""
    import torch

    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, param[0].numel() ** -0.5, generator=generator)
            elif "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()
        for buffer in module.buffers():
            buffer.zero_()


def make_base(folder: Path, scale: str) -> None:
    """The base pipeline, one component at a time in fp16, written with save_pretrained."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg, text_cfg, vae_cfg = _configs(scale)
    generator = torch.Generator().manual_seed(SEED)
    components = {}
    for name, build in (
        ("unet", lambda: UNet2DConditionModel(**unet_cfg)),
        ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**text_cfg))),
        ("vae", lambda: AutoencoderKL(**vae_cfg)),
    ):
        with torch.device("meta"):
            module = build().to(torch.float16)
        module = module.to_empty(device="cpu")
        _random_fp16(module, generator)
        components[name] = module.eval()
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    with tempfile.TemporaryDirectory() as scratch:
        pipe = StableDiffusionPipeline(
            **components,
            tokenizer=_tokenizer(Path(scratch)),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(folder)


def make_fine_tune(base: Path, folder: Path, index: int) -> None:
    """The base loaded with DiffusionPipeline.from_pretrained (fp16), every weight moved by seeded noise, saved."""
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(base, dtype=torch.float16)
    generator = torch.Generator().manual_seed(SEED + 1 + index)
    with torch.no_grad():
        for name in COMPONENT_FILES:
            for param in getattr(pipe, name).parameters():
                param.add_(torch.randn(param.shape, generator=generator, dtype=torch.float16), alpha=NOISE)
    pipe.save_pretrained(folder)


def make(root: Path, scale: str, models: int = 4) -> None:
    """Writes the base and fine-tunes under root that are not there yet, each in a child process so that memory is
    that of one pipeline at a time; the last one written is loaded back with DiffusionPipeline.from_pretrained."""
    names = ["base", *[f"ft{i}" for i in range(models - 1)]]
    for name in names:
        folder = root / name
        if (folder / "model_index.json").is_file():
            continue
        tmp = root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        argv = [sys.executable, __file__, "_write", name, str(root / "base"), str(tmp), scale]
        subprocess.run(argv, check=True)
        tmp.rename(folder)
        print(f"  wrote {folder} ({folder_bytes(folder) / 1e9:.2f} GB)", flush=True)
    check = (
        "import sys, torch; from diffusers import DiffusionPipeline; "
        "DiffusionPipeline.from_pretrained(sys.argv[1], dtype=torch.float16)"
    )
    subprocess.run([sys.executable, "-c", check, str(root / names[-1])], check=True)


def weight_files(folder: Path) -> list[Path]:
    return [folder / name / file for name, file in COMPONENT_FILES.items()]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in weight_files(folder))


# --- sd-mecha -------------------------------------------------------------------------------------------------------

# Runs in sd-mecha's venv: a diffusers pipeline folder -> one sd1-ldm (A1111 layout) safetensors file, with the key
# mapping and reshapes of sd-mecha's own sd1-kohya -> sd1-ldm conversion (sd1-kohya: diffusers' names behind te./unet./
# vae. prefixes). In sd-mecha 1.1.8 that conversion fails as a merge method (its __call__ indexes the key relation,
# `relation["kohya_sd"]`, a TypeError), so its module's key functions are applied here directly, for every key of
# sd-mecha's sd1-ldm config. One correction: its VAE map sends the mid-block attention's `norm` (LDM) to `norm`, where
# diffusers (and sd-mecha's own sd1-kohya config) name it `group_norm`. transformers 5 writes CLIPTextModel keys without the `text_model.` prefix that sd1-kohya
# expects: it is added back.
SD_MECHA_TO_LDM = textwrap.dedent("""
    import sys
    import sd_mecha
    from safetensors.torch import load_file, save_file
    from sd_mecha.extensions import model_configs
    convert = sys.modules["sd_mecha.extensions.builtin.model_configs.convert_sd1_kohya_to_original"]
    folder, out, files = sys.argv[1], sys.argv[2], dict(a.split("=") for a in sys.argv[3:])
    state = {}
    for component, file in files.items():
        for key, value in load_file(f"{folder}/{component}/{file}").items():
            if component == "text_encoder":
                key = "te." + (key if key.startswith("text_model.") else "text_model." + key)
            else:
                key = {"unet": "unet.", "vae": "vae."}[component] + key
            state[key] = value
    ldm, used = {}, set()
    for ldm_key in model_configs.resolve("sd1-ldm").keys():
        reshape = False
        if ldm_key.startswith("model.diffusion_model."):
            key = convert.convert_unet_key(ldm_key)
        elif ldm_key.startswith("cond_stage_model."):
            key = convert.convert_clip_l_key(ldm_key)
        elif ldm_key.startswith("first_stage_model."):
            key, reshape = convert.convert_vae_key(ldm_key)
            key = key.replace("mid_block.attentions.0.norm.", "mid_block.attentions.0.group_norm.")
        else:
            continue
        if key in state:
            ldm[ldm_key] = convert.reshape_weight_for_sd(state[key]).contiguous() if reshape else state[key]
            used.add(key)
    if used != state.keys():
        sys.exit(f"no sd1-ldm key for {len(state.keys() - used)} tensors, e.g. {sorted(state.keys() - used)[:3]}")
    save_file(ldm, out, metadata={"format": "pt"})
""")

# Runs in sd-mecha's venv: one task through sd-mecha's API, its defaults (threads, cpu, float32 merge dtype).
SD_MECHA_MERGE = textwrap.dedent("""
    import json, sys
    import torch, sd_mecha
    task, out, paths = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3:]
    models = [sd_mecha.model(p, config="sd1-ldm") for p in paths]
    if "alpha" in task:
        recipe = sd_mecha.add_difference(models[0], models[1], models[2], alpha=task["alpha"])
    else:  # a weighted sum as chained lerps: after model i the running result is the normalised partial sum
        recipe, total = models[0], task["weights"][0]
        for model, weight in zip(models[1:], task["weights"][1:]):
            total += weight
            recipe = sd_mecha.weighted_sum(recipe, model, alpha=weight / total)
    sd_mecha.merge(recipe, output=out, output_dtype=torch.float16)
""")

# Runs in this venv: diffusers' community checkpoint_merger, loaded from its file (it is not in the wheel). The
# pipeline is instantiated directly: `custom_pipeline=` would first load a whole pipeline only to call merge on it.
CHECKPOINT_MERGER = textwrap.dedent("""
    import importlib.util, json, sys
    import torch
    path, task, out, folders = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4:]
    spec = importlib.util.spec_from_file_location("checkpoint_merger", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    merger = module.CheckpointMergerPipeline()
    if "alpha" in task:  # add_diff: theta0 + (theta1 - theta2) * (1 - alpha)
        kwargs = {"interp": "add_diff", "alpha": 1 - task["alpha"]}
    else:  # weighted_sum: (1 - alpha) theta0 + alpha theta1
        kwargs = {"interp": None, "alpha": task["weights"][1]}
    pipe = merger.merge(folders, torch_dtype=torch.float16, local_files_only=True, **kwargs)
    pipe.save_pretrained(out)
""")


# --- comparison -----------------------------------------------------------------------------------------------------


def _diffusers_tensors(other: Path, reference: Path) -> dict[str, dict]:
    """Per component, name -> tensor (lazy for a pipeline folder; an sd1-ldm file is converted by diffusers' own
    single-file converters, with the reference's component configs)."""
    from safetensors import safe_open

    if other.is_dir():
        out = {}
        for component, file in COMPONENT_FILES.items():
            handle = safe_open(str(other / component / file), "pt")
            out[component] = {k: (handle, k) for k in handle.keys()}  # noqa: SIM118
        return out
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from safetensors.torch import load_file

    checkpoint = load_file(str(other))
    config = {c: json.loads((reference / c / "config.json").read_text()) for c in ("unet", "vae")}
    return {
        "unet": convert_ldm_unet_checkpoint(checkpoint, config["unet"]),
        "vae": convert_ldm_vae_checkpoint(checkpoint, config["vae"]),
        # diffusers' converter keeps CLIP's `text_model.` prefix, which transformers 5 no longer writes
        "text_encoder": {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(checkpoint).items()},
    }


def _ordered(half):  # noqa: ANN001, ANN202
    """fp16 bit patterns as integers in the order of the values (adjacent fp16 values differ by 1)."""
    import torch

    bits = half.view(torch.int16).int()
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def compare(reference: Path, other: Path) -> dict:
    """hf-fusion's pipeline folder against another output (folder or sd1-ldm file), tensor by tensor: names, shapes
    and dtypes, max |a - b|, and the share of elements more than one fp16 ulp apart (more than one representable
    fp16 value between them; for other dtypes, more than one fp16 ulp of the larger magnitude)."""
    import torch
    from safetensors import safe_open

    def get(entry):  # noqa: ANN001, ANN202
        return entry[0].get_tensor(entry[1]) if isinstance(entry, tuple) else entry

    theirs = _diffusers_tensors(other, reference)
    problems: list[str] = []
    elements = beyond = tensors = 0
    max_diff, worst = 0.0, ""
    for component, file in COMPONENT_FILES.items():
        with safe_open(str(reference / component / file), "pt") as ours:
            names, other_names = set(ours.keys()), set(theirs[component])
            problems += [f"only in hf-fusion's: {component}.{k}" for k in sorted(names - other_names)]
            problems += [f"only in the other: {component}.{k}" for k in sorted(other_names - names)]
            for name in sorted(names & other_names):
                a, b = ours.get_tensor(name), get(theirs[component][name])
                if a.numel() != b.numel() or a.dtype != b.dtype:
                    problems.append(f"{component}.{name}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}")
                    if a.numel() != b.numel():
                        continue
                a, b = a.flatten(), b.flatten()
                for s in range(0, a.numel(), SLICE):  # slices that stay in cache: several times faster on 2 cores
                    x, y = a[s : s + SLICE], b[s : s + SLICE]
                    if x.dtype == y.dtype == torch.float16:  # fp16 values apart, from their bits in value order
                        beyond += int(((_ordered(x) - _ordered(y)).abs_() > 1).sum())
                    else:
                        x, y = x.float(), y.float()
                        _, exponent = torch.frexp(torch.maximum(x.abs(), y.abs()))
                        beyond += int(((x - y).abs() > torch.ldexp(torch.ones_like(x), exponent - 11)).sum())
                    top = float((x.float() - y.float()).abs_().max())
                    if top > max_diff or math.isnan(top):
                        max_diff, worst = top, f"{component}.{name}"
                elements += a.numel()
                tensors += 1
    return {
        "problems": problems[:10],
        "tensors": tensors,
        "elements": elements,
        "max_abs_diff": max_diff,
        "worst_tensor": worst,
        "fraction_beyond_ulp": beyond / elements if elements else 0.0,
    }


# --- the run --------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    root = (args.workload_dir or Path("bench_workload") / ("sd15-tiny" if args.scale == "tiny" else "sd15")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    sd_mecha = args.sd_mecha_python or (DEFAULT_SD_MECHA_PYTHON if DEFAULT_SD_MECHA_PYTHON.exists() else None)
    merger = args.checkpoint_merger if args.checkpoint_merger and args.checkpoint_merger.is_file() else None
    print(f"workload: SD 1.5-shaped fp16 pipelines ({args.scale}) in {root}", flush=True)
    # a child writes the models: a parent that grew large would inflate every child's peak RSS (fork copies it)
    subprocess.run([sys.executable, __file__, "make", str(root), "--scale", args.scale], check=True)
    ldm = root / "ldm"
    if sd_mecha:
        ldm.mkdir(exist_ok=True)
        for name in SCALING_MODELS:
            target = ldm / f"{name}.safetensors"
            if not target.is_file():
                files = [f"{c}={f}" for c, f in COMPONENT_FILES.items()]
                tmp = ldm / f".{name}.tmp.safetensors"
                subprocess.run([str(sd_mecha), "-c", SD_MECHA_TO_LDM, str(root / name), str(tmp), *files], check=True)
                if name == "base":  # the mapping, checked against diffusers' independent converters
                    argv = [sys.executable, __file__, "compare", str(root / name), str(tmp)]
                    check = json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)
                    if check["problems"] or check["max_abs_diff"] != 0:
                        sys.exit(f"the sd1-ldm file of {root / name} does not read back as the pipeline: {check}")
                tmp.rename(target)
                print(f"  wrote {target} (sd1-ldm, by sd-mecha's key mapping)", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="hf-fusion-bench-", dir=root))
    offline = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    results: list[Measurement] = []
    notes: list[str] = []

    def best(make) -> Measurement:  # noqa: ANN001
        runs = [make() for _ in range(max(1, args.repeat))]
        return min(runs, key=lambda r: (not r.ok, r.seconds))

    def fresh(name: str) -> Path:
        path = scratch / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        return path

    def warm(files: list[Path]) -> None:
        subprocess.run([sys.executable, "-c", IO_FLOOR, *map(str, files), str(scratch / "warm.bin"), "0"], check=True)

    def hf_fusion(task: dict, out: Path) -> list[str]:
        folders = [str(root / m) for m in task["models"]]
        argv = [sys.executable, "-m", "hf_fusion", "merge", "--quiet", "--dtype", "float16", "--output", str(out)]
        if "alpha" in task:  # task arithmetic on the third: a + alpha (b - c) = c + 1 (a - c) + alpha (b - c)
            return argv + [
                "--base",
                folders[2],
                "--repo-ids",
                *folders[:2],
                "--method",
                "add_difference",
                "--param",
                f"weights=[1,{task['alpha']}]",
                "--param",
                "scaling_factor=1",
            ]
        weights = ",".join(f"{w:g}" for w in task["weights"])
        return argv + [
            "--repo-ids",
            *folders,
            "--method",
            "weighted_average",
            "--param",
            f"weights=[{weights}]",
            "--param",
            "normalize=false",
        ]

    def compare_into(row: Measurement, reference: Path, other: Path) -> None:
        done = subprocess.run(
            [sys.executable, __file__, "compare", str(reference), str(other)], capture_output=True, text=True
        )
        if done.returncode:
            notes.append(f"{row.name} {row.method}: comparison failed: {done.stderr.strip()[-300:]}")
            return
        report = json.loads(done.stdout)
        row.max_abs_diff, row.fraction_beyond_ulp = report["max_abs_diff"], report["fraction_beyond_ulp"]
        notes.extend(f"{row.name} {row.method} vs hf-fusion: {p}" for p in report["problems"])
        print(
            f"    vs hf-fusion: max |diff| {row.max_abs_diff:.3g} ({report['worst_tensor'] or '-'}), "
            f"{row.fraction_beyond_ulp:.3%} beyond 1 fp16 ulp, {report['tensors']} tensors",
            flush=True,
        )

    def skipped(tool: str, task: str, models: int, why: str) -> None:
        results.append(Measurement(tool, task, models, math.nan, math.nan, False, why))
        print(f"  {tool:12s} {task:22s} {why}", flush=True)

    for label, task in TASKS.items():
        folders = [root / m for m in task["models"]]
        inputs = [f for folder in folders for f in weight_files(folder)]
        n, out_bytes = len(folders), folder_bytes(folders[0])
        print(f"{label}: {n} models", flush=True)
        warm(inputs)
        results.append(
            best(
                lambda: measure(
                    "io floor",
                    label,
                    n,
                    [sys.executable, "-c", IO_FLOOR, *map(str, inputs), str(fresh("io.bin")), str(out_bytes)],
                )
            )
        )
        hf_out = scratch / f"hf-{label}"
        hf = best(lambda: measure("hf-fusion", label, n, hf_fusion(task, fresh(hf_out.name)), offline))
        results.append(hf)
        if sd_mecha:
            ldm_inputs = [ldm / f"{m}.safetensors" for m in task["models"]]
            warm(ldm_inputs)
            mecha_out = scratch / f"mecha-{label}.safetensors"
            argv = [str(sd_mecha), "-c", SD_MECHA_MERGE, json.dumps(task)]
            row = best(
                lambda: measure(
                    "sd-mecha", label, n, [*argv, str(fresh(mecha_out.name)), *map(str, ldm_inputs)], offline
                )
            )
            results.append(row)
            if row.ok and hf.ok:
                compare_into(row, hf_out, mecha_out)
            mecha_out.unlink(missing_ok=True)
        else:
            skipped("sd-mecha", label, n, "not measured (no --sd-mecha-python)")
        if merger is None:
            skipped("checkpoint_merger", label, n, "not measured (no --checkpoint-merger file)")
        elif "weights" in task and n != 2:
            skipped("checkpoint_merger", label, n, "not supported (its weighted sum takes 2 models)")
        else:
            warm(inputs)
            cm_out = scratch / f"cm-{label}"
            argv = [sys.executable, "-c", CHECKPOINT_MERGER, str(merger), json.dumps(task)]
            row = best(
                lambda: measure(
                    "checkpoint_merger", label, n, [*argv, str(fresh(cm_out.name)), *map(str, folders)], offline
                )
            )
            results.append(row)
            if row.ok and hf.ok:
                compare_into(row, hf_out, cm_out)
            shutil.rmtree(cm_out, ignore_errors=True)
        shutil.rmtree(hf_out, ignore_errors=True)
    if args.scaling:
        folders = [root / m for m in SCALING_MODELS]
        inputs = [f for folder in folders for f in weight_files(folder)]
        warm(inputs)
        out_bytes = folder_bytes(folders[0])
        results.append(
            best(
                lambda: measure(
                    "io floor",
                    SCALING_TASK,
                    len(folders),
                    [sys.executable, "-c", IO_FLOOR, *map(str, inputs), str(fresh("io.bin")), str(out_bytes)],
                )
            )
        )
        task = {"models": SCALING_MODELS, "weights": [1 / len(SCALING_MODELS)] * len(SCALING_MODELS)}
        out = fresh(f"hf-{SCALING_TASK}")
        results.append(
            best(lambda: measure("hf-fusion", SCALING_TASK, len(folders), hf_fusion(task, fresh(out.name)), offline))
        )
    shutil.rmtree(scratch, ignore_errors=True)

    floors = {r.method: r for r in results if r.name == "io floor"}
    model_bytes = folder_bytes(root / "base")
    size = f"{model_bytes / 1e9:.2f} GB" if model_bytes >= 1e8 else f"{model_bytes / 1e6:.1f} MB"
    params = "1.07B" if args.scale == "full" else "tiny"
    lines = [
        f"Workload: SD 1.5-shaped diffusers pipelines ({params} parameters: UNet, CLIP ViT-L/14 text encoder, VAE; "
        f"fp16 safetensors, {size} each), random base + fine-tunes (base + N(0, {NOISE:g}^2)); "
        f"warm page cache; {os.cpu_count()} CPU cores, Python {platform.python_version()}. Wall time includes "
        "interpreter start and imports; peak RSS is the process's own maximum resident set. sd-mecha reads and "
        "writes sd1-ldm single files (converted from the same pipelines); its output is compared after diffusers' "
        "single-file converters. Ratios are to the I/O floor of the same task. The last columns compare each output "
        "with hf-fusion's, tensor by tensor.",
        "",
        "| tool | task | models | wall time (s) | peak RSS (MB) | x I/O floor | max abs diff vs hf-fusion | "
        "elements beyond 1 fp16 ulp |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if math.isnan(r.seconds):
            lines.append(f"| {r.name} | {r.method} | {r.models} | {r.note} |  |  |  |  |")
            continue
        time_text = f"{r.seconds:.2f}" if r.ok else f"failed ({r.note})"
        floor = floors.get(r.method)
        ratio = f"{r.seconds / floor.seconds:.1f}" if floor and floor.ok and r.ok else ""
        diff = "" if r.max_abs_diff is None else f"{r.max_abs_diff:.3g}"
        share = "" if r.fraction_beyond_ulp is None else f"{r.fraction_beyond_ulp:.3%}"
        lines.append(
            f"| {r.name} | {r.method} | {r.models} | {time_text} | {r.peak_rss_mb:.0f} | {ratio} | {diff} | {share} |"
        )
    weighted = {r.models: r.peak_rss_mb for r in results if r.name == "hf-fusion" and r.method.startswith("weighted")}
    lines += [
        "",
        "hf-fusion weighted_sum peak RSS by model count: "
        + ", ".join(f"{n} models {mb:.0f} MB" for n, mb in sorted(weighted.items())),
    ]
    if notes:
        lines += ["", "Notes:", *[f"- {n}" for n in notes]]
    rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(r).items()} for r in results]
    write_report(lines, rows, args.markdown, args.json)
    measured = [r for r in results if not math.isnan(r.seconds)]
    return 0 if all(r.ok for r in measured) and not notes else 1


def main() -> int:
    if len(sys.argv) == 6 and sys.argv[1] == "_write":  # one model, in its own process (see make)
        name, base, folder, scale = sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5]
        if name == "base":
            make_base(folder, scale)
        else:
            make_fine_tune(base, folder, int(name.removeprefix("ft")))
        return 0
    if len(sys.argv) == 4 and sys.argv[1] == "compare":
        print(json.dumps(compare(Path(sys.argv[2]), Path(sys.argv[3]))))
        return 0
    if len(sys.argv) > 2 and sys.argv[1] == "make":
        parser = argparse.ArgumentParser(prog=f"{Path(__file__).name} make")
        parser.add_argument("folder", type=Path)
        parser.add_argument("--scale", choices=["full", "tiny"], default="full")
        parser.add_argument("--models", type=int, default=4, help="the base and models-1 fine-tunes")
        args = parser.parse_args(sys.argv[2:])
        make(args.folder, args.scale, args.models)
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=["full", "tiny"], default="full", help="SD 1.5 sizes, or a smoke test")
    parser.add_argument("--workload-dir", type=Path, help="default bench_workload/sd15 (sd15-tiny with --scale tiny)")
    parser.add_argument(
        "--sd-mecha-python",
        type=Path,
        help=f"python of a venv with sd-mecha (default {DEFAULT_SD_MECHA_PYTHON} where it exists)",
    )
    parser.add_argument(
        "--checkpoint-merger", type=Path, help="diffusers' examples/community/checkpoint_merger.py (else not measured)"
    )
    parser.add_argument(
        "--no-scaling",
        dest="scaling",
        action="store_false",
        help=f"skip hf-fusion's {SCALING_TASK} run (peak memory with 4 models)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement; the fastest is kept")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
