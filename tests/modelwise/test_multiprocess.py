"""`hf-fusion merge` under several processes (torchrun, gloo on the CPU) gives the model one process gives: the
data-driven methods split their data and add up what the processes computed, tensor-wise methods fuse on the main
process, and only the main process writes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from launch import run_cli
from safetensors.torch import load_file
from task_helpers import tiny_gpt2_pool, word_tokenizer

import hf_fusion
from hf_fusion.modelwise.data import entropy, entropy_share, logit_rows
from hf_fusion.output import TEMP_PREFIX


def launch(processes: int, *args: str) -> subprocess.CompletedProcess[str]:
    """``hf-fusion merge ARGS`` under torchrun with ``processes`` processes (one thread each)."""
    return run_cli(["merge", *args], processes=processes, timeout=240)


def pool_args(pool: Path, method: str, out: Path, params: dict[str, object]) -> list[str]:
    flags = ["--pool", str(pool / "pool.yaml"), "--method", method, "--output", str(out), "-q"]
    for name, value in params.items():
        flags += ["--param", f"{name}={value}"]
    return flags


def only_output(parent: Path, name: str) -> None:
    """``parent`` holds the output folder and nothing else: no second copy, no temporary folder left beside it."""
    assert sorted(os.listdir(parent)) == [name]
    assert not [f for f in os.listdir(parent / name) if f.startswith(TEMP_PREFIX)]


@pytest.fixture(scope="module")
def lm_pool(tmp_path_factory: pytest.TempPathFactory, hub) -> Path:
    """Two tiny GPT-2 language models with texts of very different lengths: the processes' shares of a batch hold
    different numbers of tokens (logit rows)."""
    root = tmp_path_factory.mktemp("lm-pool")
    corpora = {
        "cats": [
            "the cat sat on the mat and the cat ran to the good film",
            "a cat",
            "the cat sat",
            "cat",
            "a good cat",
        ],
        "films": ["a good movie", "film", "the bad film is a great film and a good movie , the end", "a film", "bad"],
    }
    tiny_gpt2_pool(root, hub, word_tokenizer(), corpora, "mp-lm")
    return root


# Batches that do not split evenly: 3 adaptation examples per step (2 and 1, of different lengths), 3 calibration
# batches (2 and 1).
CASES = {
    "layer_wise_adamerging": {"steps": 3, "lr": 0.05, "batch_size": 3, "seed": 3},
    "fisher_merging": {"calibration_samples": 5, "batch_size": 2},
    "regmean": {"calibration_samples": 8, "batch_size": 3},
    "ties_merging": {},
}


@pytest.mark.parametrize("method", list(CASES))
def test_two_processes_fuse_the_model_one_process_fuses(
    request: pytest.FixtureRequest, tmp_path: Path, method: str
) -> None:
    pool = request.getfixturevalue("lm_pool" if method == "layer_wise_adamerging" else "cls_pool")
    params = CASES[method]
    alone, together = tmp_path / "one", tmp_path / "two"
    alone.mkdir()
    together.mkdir()
    hf_fusion.merge(pool=str(pool / "pool.yaml"), method=method, output=alone / "out", show_progress=False, **params)
    run = launch(2, *pool_args(pool, method, together / "out", params))
    assert run.returncode == 0, run.stderr[-4000:]
    only_output(together, "out")
    assert sorted(os.listdir(together / "out")) == sorted(os.listdir(alone / "out"))
    one, two = alone / "out" / "model.safetensors", together / "out" / "model.safetensors"
    if method == "ties_merging":
        assert two.read_bytes() == one.read_bytes()
        return
    want, got = load_file(one), load_file(two)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    if method == "layer_wise_adamerging":
        a, b = (json.loads((d / "out" / "merging_weights.json").read_text()) for d in (alone, together))
        assert b["steps"] == a["steps"] == 3
        coefficients = torch.tensor(a["coefficients"])
        assert not torch.allclose(coefficients, torch.full_like(coefficients, 0.3))  # it learned something
        torch.testing.assert_close(torch.tensor(b["coefficients"]), coefficients, rtol=1e-5, atol=1e-6)
        assert b["last_entropy"] == pytest.approx(a["last_entropy"], rel=1e-5)


def test_fp16_adaptation_with_a_batch_smaller_than_the_processes(lm_pool: Path, tmp_path: Path) -> None:
    """One example per step and two processes: the second has nothing to run at every step, yet steps (its loss
    scaled like the first's) and the coefficients are one process's."""
    params = {"steps": 2, "lr": 0.05, "batch_size": 1, "seed": 3}
    hf_fusion.merge(
        pool=str(lm_pool / "pool.yaml"),
        method="layer_wise_adamerging",
        output=tmp_path / "one",
        mixed_precision="fp16",
        show_progress=False,
        **params,
    )
    args = pool_args(lm_pool, "layer_wise_adamerging", tmp_path / "two", params)
    run = launch(2, *args, "--mixed-precision", "fp16")
    assert run.returncode == 0, run.stderr[-4000:]
    a, b = (json.loads((tmp_path / d / "merging_weights.json").read_text()) for d in ("one", "two"))
    torch.testing.assert_close(torch.tensor(b["coefficients"]), torch.tensor(a["coefficients"]), rtol=1e-4, atol=1e-5)


def test_an_error_on_the_main_process_stops_every_process(cls_pool: Path, tmp_path: Path) -> None:
    """The push target is checked on the main process only (no token here): the others hear of the refusal instead
    of waiting for ever, and nothing is written."""
    run = launch(2, *pool_args(cls_pool, "ties_merging", tmp_path / "out", {}), "--push", "alice/fused")
    assert run.returncode != 0
    assert "token" in run.stderr.lower()
    assert not (tmp_path / "out").exists()


# --- the loss of a share of a batch ------------------------------------------------------------------------------


def test_the_shares_of_the_entropy_add_up_to_the_whole_batchs_and_so_do_their_gradients() -> None:
    torch.manual_seed(0)
    logits = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    whole = entropy(logits)
    (want,) = torch.autograd.grad(whole, logits)
    shares = [logits[0::2], logits[1::2]]  # 4 rows and 3 rows, as two processes take them
    parts = [entropy_share(s, 7) for s in shares]
    torch.testing.assert_close(sum(parts), whole)
    (got,) = torch.autograd.grad(sum(parts), logits)
    torch.testing.assert_close(got, want)


def test_a_share_is_weighted_by_its_rows_not_its_examples() -> None:
    """Causal LM logits have a row per real token: a process whose examples hold more tokens holds more of the
    batch's mean entropy."""
    torch.manual_seed(1)
    tokens_a, tokens_b = torch.randn(9, 11), torch.randn(2, 11)  # one process's examples have 9 tokens, the other's 2
    assert (logit_rows(tokens_a), logit_rows(torch.randn(2, 3, 11))) == (9, 6)
    total = logit_rows(tokens_a) + logit_rows(tokens_b)
    combined = entropy_share(tokens_a, total) + entropy_share(tokens_b, total)
    torch.testing.assert_close(combined, entropy(torch.cat([tokens_a, tokens_b])))
    halves = (entropy(tokens_a) + entropy(tokens_b)) / 2
    assert not torch.allclose(combined, halves)
