"""Model cards for fused models, rendered from the recipe (and evaluation report) with huggingface_hub.ModelCard.

The front matter tells the Hub what the model is: every input as ``base_model`` with ``base_model_relation: merge``,
the pipeline tag and library from the config, the license when every input agrees on one (``unknown``
otherwise), and ``model-index`` results when an evaluation report exists. The body names the method and paper,
every input with its exact commit, the parameters, the scores, a usage snippet and the command that reproduces it.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData, constants

from hf_fusion.errors import FusionError
from hf_fusion.pipeline_files import MODEL_INDEX
from hf_fusion.recipe import RECIPE_FILENAME, ModelRef, Recipe
from hf_fusion.registry import get_method
from hf_fusion.reports.report import EvaluationReport

CARD_FILENAME = "README.md"
ADAPTER_CONFIG_FILENAME = "adapter_config.json"
ADAPTER_REPORT_FILENAME = "adapter_fusion.json"
_PEFT_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
}
TOKENIZER_FILENAME = "tokenizer_config.json"
CUSTOM_MODEL_TYPE_PREFIX = "hf_fusion_"  # model types of hf_fusion.models (ensembles, routed mixtures)

# (transformers mapping, pipeline tag, Auto class): the most specific task first
_TASKS = (
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "text-classification", "AutoModelForSequenceClassification"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "token-classification", "AutoModelForTokenClassification"),
    ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "question-answering", "AutoModelForQuestionAnswering"),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "text2text-generation", "AutoModelForSeq2SeqLM"),
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "text-generation", "AutoModelForCausalLM"),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "fill-mask", "AutoModelForMaskedLM"),
    ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "image-classification", "AutoModelForImageClassification"),
    (
        "MODEL_FOR_ZERO_SHOT_IMAGE_CLASSIFICATION_MAPPING_NAMES",
        "zero-shot-image-classification",
        "AutoModelForZeroShotImageClassification",
    ),
    ("MODEL_FOR_IMAGE_MAPPING_NAMES", "image-feature-extraction", "AutoModel"),
    ("MODEL_MAPPING_NAMES", "feature-extraction", "AutoModel"),
)


def task_of(config: dict[str, Any] | None) -> tuple[str | None, str]:
    """(pipeline tag, Auto class) for a config's architecture; (None, "AutoModel") when transformers has none."""
    archs = (config or {}).get("architectures") or []
    if not archs:
        return None, "AutoModel"
    from transformers.models.auto import modeling_auto

    for mapping_name, tag, auto_class in _TASKS:
        mapping = getattr(modeling_auto, mapping_name, {})
        for value in mapping.values():
            names = value if isinstance(value, (list, tuple)) else (value,)
            if archs[0] in names:
                return tag, auto_class
    return None, "AutoModel"


COMPARISON_IMAGE = "comparison.png"
"""A picture grid (prompts x models) that ``hf-fusion compare-images`` wrote into a fused pipeline's folder."""


def pipeline_task(class_name: str) -> str:
    """The Hub pipeline tag of a diffusers pipeline class."""
    if "Img2Img" in class_name or "Inpaint" in class_name:
        return "image-to-image"
    return "text-to-image"


def pipeline_usage(load_path: str, class_name: str) -> dict[str, str]:
    """The card's Usage section for a pipeline folder: diffusers loads it as it is; a text-to-image pipeline also
    draws a picture (the others need an input image of the user's)."""
    lines = [
        "from diffusers import DiffusionPipeline",
        "",
        f"pipe = DiffusionPipeline.from_pretrained({json.dumps(load_path)})",
    ]
    if pipeline_task(class_name) == "text-to-image":
        lines += ['image = pipe("a photo of a cat").images[0]', 'image.save("cat.png")']
    else:
        lines.append(f"# a {class_name}: call pipe(prompt, image=...) with your own image")
    code = "\n".join(lines)
    return {
        "install": "It needs diffusers, transformers and PyTorch only: `pip install diffusers transformers torch`.",
        "code": code,
    }


def license_of(ref: ModelRef) -> str | None:
    """The license in an input's card front matter (local folder, or the Hub card cached by the merge)."""
    path: Path | None = None
    if ref.is_local:
        from hf_fusion.catalog import resolve_builtin

        try:
            candidate = Path(resolve_builtin(ref.path)).expanduser() / CARD_FILENAME
        except FusionError:
            return None
        path = candidate if candidate.is_file() else None
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(ref.path, CARD_FILENAME, revision=ref.commit)
        path = Path(cached) if isinstance(cached, str) else None
    if path is None or not path.read_text(errors="replace").startswith("---"):
        return None  # no front matter, no license
    try:
        return ModelCard.load(path, ignore_metadata_errors=True).data.get("license")
    except Exception:  # an unreadable card means an unknown license, never a failed fusion
        return None


def needs_hf_fusion(config: dict[str, Any] | None) -> bool:
    """Whether loading the model needs ``import hf_fusion.models`` (its architecture is one hf-fusion defines)."""
    return str((config or {}).get("model_type", "")).startswith(CUSTOM_MODEL_TYPE_PREFIX)


def install_hint() -> str:
    """How to install this hf-fusion: it is not on a package index, so from its source (a checkout or a wheel)."""
    from hf_fusion.version import __version__

    return (
        f"hf-fusion {__version__}, installed from its source (it is not on PyPI): `pip install ./hf-fusion` from "
        f"a checkout of that version, or `pip install hf_fusion-{__version__}-py3-none-any.whl` from a wheel built "
        "from it"
    )


def usage_snippet(
    config: dict[str, Any] | None,
    *,
    load_path: str,
    auto_class: str,
    subfolders: Sequence[str] = (),
    tokenizer: bool = False,
) -> dict[str, str]:
    """The card's Usage section: the install line it needs and Python code that runs as written after it.

    Stock architectures need transformers and torch only; hf-fusion's own architectures need ``hf_fusion.models``
    imported first (it registers them with the Auto classes); per-task outputs load one subfolder.
    """
    custom = needs_hf_fusion(config)
    remote = custom and "auto_map" in (config or {})  # the architecture's code ships with the model
    lines = []
    if custom and not remote:
        lines.append(
            f"import hf_fusion.models  # registers the {config['model_type']} architecture "  # type: ignore[index]
            "with transformers"
        )
    lines.append(f"from transformers import {auto_class}" + (", AutoTokenizer" if tokenizer else ""))
    lines.append("")
    where = json.dumps(load_path)
    if subfolders:
        lines.append(f"# one model per input model, one subfolder each: {', '.join(subfolders)}")
        where += f", subfolder={json.dumps(subfolders[0])}"
    lines.append(f"model = {auto_class}.from_pretrained({where}{', trust_remote_code=True' if remote else ''})")
    if tokenizer:
        lines.append(f"tokenizer = AutoTokenizer.from_pretrained({where})")
    if remote:
        files = sorted({v.split(".")[0] + ".py" for v in config["auto_map"].values()})  # type: ignore[index]
        install = (
            f"It needs transformers and PyTorch only (`pip install transformers torch`): the "
            f"{config['model_type']} architecture is not a stock transformers class, and its code ships with the "  # type: ignore[index]
            f"model ({', '.join(f'`{f}`' for f in files)} and the files they import, named in `config.json`'s "
            f"`auto_map`), so `trust_remote_code=True` loads it; read those files before running them. With "
            f"{install_hint()}, `import hf_fusion.models` first registers the same classes and it loads without "
            "`trust_remote_code`."
        )
    elif custom:
        install = f"It needs {install_hint()}."
    else:
        install = "It needs transformers and PyTorch only: `pip install transformers torch`."
    return {"install": install, "code": "\n".join(lines)}


def adapter_usage(load_path: str, base: str, task_type: str | None, architecture: str | None = None) -> dict[str, str]:
    """The Usage section of a peft LoRA adapter: the base loaded with its own class (``architecture``, when
    transformers has it: the adapter's module names are that class's), else the Auto class of the adapter's task
    type, and the adapter on top."""
    import transformers

    auto_class = _PEFT_AUTO_CLASSES.get(task_type or "", "AutoModel")
    if architecture and architecture.isidentifier() and hasattr(transformers, architecture):
        auto_class = architecture
    code = "\n".join(
        [
            "from peft import PeftModel",
            f"from transformers import {auto_class}",
            "",
            f"base = {auto_class}.from_pretrained({json.dumps(base)})",
            f"model = PeftModel.from_pretrained(base, {json.dumps(load_path)})",
        ]
    )
    return {"install": "It needs peft, transformers and PyTorch: `pip install peft transformers torch`.", "code": code}


def adapter_summary(folder: Path) -> dict[str, Any] | None:
    """What an adapter output's card says about it (the base it loads on, its task type, how it was made), from
    its adapter config and report; None for other outputs."""
    config_path, report_path = folder / ADAPTER_CONFIG_FILENAME, folder / ADAPTER_REPORT_FILENAME
    if not config_path.is_file() or not report_path.is_file():
        return None
    config, report = json.loads(config_path.read_text()), json.loads(report_path.read_text())
    energies = [m["energy"] for m in report.get("modules", {}).values()]
    ranks = sorted({m["rank"] for m in report.get("modules", {}).values()})
    rank = (str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]} to {ranks[-1]}") if ranks else "-"
    mean = sum(energies) / len(energies) if energies else 1.0
    kept = f"keeping {mean:.4f} of the squared Frobenius norm of each module's delta on average (lowest {min(energies or [1.0]):.4f})"
    if report.get("route") == "exact" and min(energies or [1.0]) == 1.0:
        how = f"the method is linear in the task vectors, so the adapters' factors are concatenated with their weights (rank {rank}): it equals the dense merge up to float rounding"
    elif report.get("route") == "exact":
        how = f"the method is linear in the task vectors: the adapters' factors, concatenated with their weights, are truncated to rank {rank}, {kept}"
    else:
        how = f"each adapted module's fused delta is factorised to rank {rank} by truncated SVD, {kept}"
    saved = report.get("modules_to_save") or []
    return {
        "base": config.get("base_model_name_or_path"),
        "task_type": config.get("task_type"),
        "architecture": report.get("base_architecture"),
        "how": how,
        "modules": len(report.get("modules", {})),
        "saved_whole": len(saved),
        "report": ADAPTER_REPORT_FILENAME,
    }


@dataclass(frozen=True)
class _Row:
    role: str
    markdown: str
    revision: str


def _model_row(role: str, ref: ModelRef) -> _Row:
    if ref.path.startswith("builtin:"):
        return _Row(role, f"`{ref.path}`", "ships with hf-fusion")
    if ref.is_local:
        return _Row(role, f"`{ref.path}`", "local folder")
    link = f"[{ref.path}]({constants.ENDPOINT}/{ref.path})"
    if ref.commit:
        requested = f" ({ref.revision})" if ref.revision and ref.revision != ref.commit else ""
        return _Row(role, link, f"[`{ref.commit[:10]}`]({constants.ENDPOINT}/{ref.path}/tree/{ref.commit}){requested}")
    return _Row(role, link, ref.revision or "main")


def reproduce_command(recipe: Recipe, output: str, *, repo_id: str | None = None, folder: str | None = None) -> str:
    """The `hf-fusion merge` command line for a recipe, pinned to the recorded commits.

    Layer slices have no flags: the command then runs the recipe file that sits next to the card, fetched from the
    repo first (``repo_id``) or read from the output ``folder``."""

    def model_arg(ref: ModelRef) -> str:
        return f"{ref.path}@{ref.pinned}" if ref.pinned else ref.path

    if recipe.slices:
        merge = f"hf-fusion merge --config {{}} --output {shlex.quote(output)}"
        if repo_id:
            fetch = f"hf download {shlex.quote(repo_id)} {RECIPE_FILENAME} --local-dir ."
            return f"{fetch} && {merge.format(RECIPE_FILENAME)}"
        return merge.format(shlex.quote(str(Path(folder or ".").expanduser().resolve() / RECIPE_FILENAME)))
    args = ["hf-fusion", "merge", "--repo-ids", *map(model_arg, recipe.models)]
    if recipe.base:
        args += ["--base", model_arg(recipe.base)]
    args += ["--method", recipe.method]
    for name, value in recipe.parameters.items():
        args += ["--param", f"{name}={value if isinstance(value, str) else json.dumps(value)}"]
    if recipe.dtype != "auto":
        args += ["--dtype", recipe.dtype]
    if recipe.exclude:
        args += ["--exclude", *recipe.exclude]
    if recipe.heads:
        args += ["--heads", *recipe.heads]
    if recipe.tokenizer:
        args += ["--tokenizer", recipe.tokenizer]
    if recipe.chat_template:
        args += ["--chat-template", recipe.chat_template]
    if recipe.components:
        args += ["--components", ",".join(recipe.components)]
    if recipe.variant:
        args += ["--variant", recipe.variant]
    if recipe.output_format != "dense":
        args += ["--output-format", recipe.output_format]
    if recipe.rank is not None:
        args += ["--rank", str(recipe.rank)]
    args += ["--output", output]
    return " ".join(shlex.quote(a) for a in args)


def _subset_sentence(report: EvaluationReport) -> str | None:
    """Says which tasks were scored on part of their split, how many examples, and how they were drawn."""
    subsets = report.subset_results
    if not subsets:
        return None
    counts = ", ".join(
        f"{r.task}: {r.examples if r.examples is not None else report.limit} of its {r.split} split" for r in subsets
    )
    seeds = sorted({r.subset_seed for r in subsets})
    whole = [r.task for r in report.results if not r.is_subset]
    rest = f" {', '.join(whole)} {'was' if len(whole) == 1 else 'were'} scored on the whole split." if whole else ""
    return (
        f"**These scores come from a subset, not the whole split** (`hf-fusion evaluate --limit`): {counts}. "
        f"The examples are a fixed sample: the split shuffled with seed {', '.join(map(str, seeds))} and the first "
        f"examples kept, the same for every model in the table.{rest} Scores on the full split may differ."
    )


def _template() -> str:
    return resources.files("hf_fusion.model_cards").joinpath("fused_model.md.j2").read_text()


def _eval_results(report: EvaluationReport) -> list[EvalResult] | None:
    """The fused model's scores as the card's model-index (what the Hub shows and ranks)."""
    results = [
        EvalResult(
            task_type=r.task_type,
            dataset_type=r.dataset,
            dataset_name=r.task,
            dataset_config=r.dataset_config,
            dataset_split=r.split_label(),
            metric_type=r.metric,
            metric_value=r.scores[report.fused],
        )
        for r in report.results
        if r.scores.get(report.fused) is not None
    ]
    return results or None


def _evaluation_table(report: EvaluationReport) -> dict[str, Any]:
    """Every model's score per task, for the card's Evaluation table."""
    columns = report.columns()
    rows = [
        {
            "task": r.task,
            "dataset": r.dataset,
            "split": r.split_label(),
            "metric": r.metric,
            "examples": "" if r.examples is None else str(r.examples),
            "cells": [f"{r.scores[c]:.4f}" if r.scores.get(c) is not None else "" for c in columns],
        }
        for r in report.results
    ]
    return {"columns": columns, "rows": rows, "subset": _subset_sentence(report)}


def build_card(
    recipe: Recipe,
    *,
    config: dict[str, Any] | None,
    repo_id: str | None,
    load_path: str,
    report: EvaluationReport | None = None,
    licenses: Sequence[str | None] = (),
    subfolders: Sequence[str] = (),
    tokenizer: bool = False,
    pipeline: str | None = None,
    comparison: bool = False,
    adapter: dict[str, Any] | None = None,
) -> ModelCard:
    """Renders the card of a fused model; ``licenses`` are the inputs' licenses, in any order. ``subfolders`` name
    the models of a method that fuses one model per input (each loads with ``subfolder=``); ``tokenizer`` says the
    output holds a tokenizer, which the usage snippet then loads too."""
    spec = get_method(recipe.method)
    tag, auto_class = task_of(config)
    library = "transformers" if tag is not None else None
    if pipeline is not None:
        tag, library = pipeline_task(pipeline), "diffusers"
    inputs = [r for r in [recipe.base, *recipe.models] if r is not None]
    hub_inputs = list(dict.fromkeys(r.path for r in inputs if not r.is_local))
    relation = "merge"
    if adapter is not None:  # a peft adapter on its base: the Hub lists it under the base's adapters
        tag, library, relation = None, "peft", "adapter"
        hub_inputs = [recipe.base.path] if recipe.base is not None and not recipe.base.is_local else []
    license_ = licenses[0] if licenses and all(lic and lic == licenses[0] for lic in licenses) else "unknown"
    model_name = (repo_id or Path(load_path).name).split("/")[-1]
    eval_results = _eval_results(report) if report is not None else None
    evaluation = _evaluation_table(report) if report is not None else None
    data = ModelCardData(
        base_model=(hub_inputs[0] if adapter is not None else hub_inputs) if hub_inputs else None,
        library_name=library,
        pipeline_tag=tag,
        license=license_,
        tags=["merge", "hf-fusion", spec.name],
        model_name=model_name if eval_results else None,
        eval_results=eval_results,
        **({"base_model_relation": relation} if hub_inputs else {}),
    )
    rows = ([_model_row("base", recipe.base)] if recipe.base else []) + [_model_row("fused", m) for m in recipe.models]
    return ModelCard.from_template(
        data,
        template_str=_template(),
        model_name=model_name,
        model_count=len(recipe.models),
        base=_model_row("base", recipe.base) if recipe.base else None,
        method={
            "name": spec.name,
            "summary": spec.summary,
            "paper_title": spec.paper.title if spec.paper else None,
            "paper_url": spec.paper.url if spec.paper else None,
        },
        models=rows,
        parameters=[(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in recipe.parameters.items()],
        dtype=recipe.dtype,
        exclude=recipe.exclude,
        evaluation=evaluation,
        adapter=adapter,
        usage=adapter_usage(load_path, adapter["base"], adapter["task_type"], adapter["architecture"])
        if adapter is not None
        else pipeline_usage(load_path, pipeline)
        if pipeline is not None
        else usage_snippet(
            config, load_path=load_path, auto_class=auto_class, subfolders=subfolders, tokenizer=tokenizer
        ),
        pipeline=pipeline,
        components=recipe.components,
        comparison=COMPARISON_IMAGE if comparison else None,
        install_hint=install_hint(),
        command=reproduce_command(recipe, f"./{model_name}", repo_id=repo_id, folder=load_path),
        recipe_yaml=recipe.to_yaml().rstrip(),
        subfolders=[{"name": n, "model": r.path} for n, r in zip(subfolders, recipe.models)],
    )


def model_subfolders(folder: Path) -> list[str]:
    """Subfolders holding a model (config.json), when the folder holds one fused model per input model."""
    if (folder / "config.json").is_file():
        return []
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and (d / "config.json").is_file())


def write_card(folder: Path, *, repo_id: str | None = None, load_path: str | None = None) -> Path:
    """(Re)writes ``folder/README.md`` from its recipe, config and evaluation report.

    ``load_path`` is what the usage snippet loads: the repo id, else the folder (its final place, when ``folder`` is
    still the temporary one).
    """
    if not folder.exists():
        raise FusionError(f"{folder} does not exist: give the folder a merge wrote (its --output).")
    if not folder.is_dir():
        raise FusionError(f"{folder} is a file, not a folder: give the folder a merge wrote (its --output).")
    recipe_path = folder / RECIPE_FILENAME
    if not recipe_path.is_file():
        raise FusionError(
            f"{folder} has no {RECIPE_FILENAME}: it was not made by hf-fusion, so no card can be written."
        )
    recipe = Recipe.from_yaml(recipe_path)
    index_path = folder / MODEL_INDEX
    pipeline = json.loads(index_path.read_text()).get("_class_name") if index_path.is_file() else None
    subfolders = model_subfolders(folder) if pipeline is None else []
    model_folder = folder / (subfolders[0] if subfolders else ".")
    config_path = model_folder / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else None
    inputs = [r for r in [recipe.base, *recipe.models] if r is not None]
    card = build_card(
        recipe,
        config=config,
        repo_id=repo_id,
        load_path=load_path or repo_id or str(folder),
        report=EvaluationReport.load(folder),
        licenses=[license_of(r) for r in inputs],
        subfolders=subfolders,
        tokenizer=(model_folder / TOKENIZER_FILENAME).is_file(),
        pipeline=pipeline,
        comparison=(folder / COMPARISON_IMAGE).is_file(),
        adapter=adapter_summary(folder),
    )
    path = folder / CARD_FILENAME
    path.write_text(str(card) + ("\n" if not str(card).endswith("\n") else ""))
    return path
