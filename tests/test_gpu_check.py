"""benchmarks/gpu.py --small: the GPU check's whole code path (every part, the time boxes, gpu.json and gpu.md) with
small shapes on whatever device there is, so that CI proves it runs before a GPU is at hand."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytestmark = pytest.mark.slow


def test_gpu_check_small_runs_every_part(tmp_path):
    pytest.importorskip("peft")
    import gpu

    report = gpu.main(["--small", "--out", str(tmp_path), "--minutes", "6"])
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert saved["small"] and saved["correctness"]["returncode"] in (0, 5)  # 5: every cuda test skipped (no GPU)
    row = saved["training"][0]
    assert row["shape"] == "small" and row["ours_tokens_per_s"] > 0 and row["theirs_tokens_per_s"] > 0
    decoding = {r["batch"]: r for r in saved["decoding"]}
    assert set(decoding) == {1, 4, "gsm8k"} and not any("error" in r for r in saved["decoding"])
    assert all(decoding[b]["ours_graphs_tokens_per_s"] > 0 for b in (1, 4))
    assert decoding["gsm8k"]["gsm8k_eager_s"] > 0 and decoding["gsm8k"]["gsm8k_graphs_s"] > 0
    toy, paper = saved["end_to_end"]
    assert toy.get("returncode") == 0 and paper.get("returncode") == 0, saved["end_to_end"]  # each row: its exit, tail
    # or why it was skipped (a budget spent on a busy machine)
    assert paper["results"]["gsm8k"]["transfer_new"]["total"] == 8 and toy["results"]["rows"]
    table = (tmp_path / "gpu.md").read_text()
    assert "| small |" in table and "end to end, toy (quick)" in table and report["minutes"] < 6


def test_a_failing_row_is_reported_and_the_check_goes_on():
    import gpu

    def fails():
        raise RuntimeError("CUDA out of memory")

    row = gpu.guarded("decode x", fails, shape="x", batch=1)
    assert row == {"shape": "x", "batch": 1, "error": "RuntimeError: CUDA out of memory"}
    assert gpu.guarded("decode x", lambda: {"tokens_per_s": 1.0}, shape="x") == {"shape": "x", "tokens_per_s": 1.0}


@pytest.mark.parametrize("tied", [False, True])
def test_mfu_counts_the_weights_a_token_multiplies_through(tied):
    """Untied: every weight but the input embedding table (transformers' own count without embeddings); tied: the
    table is the output layer's weight, counted once."""
    pytest.importorskip("transformers")
    import gpu
    import torch

    ours, theirs = gpu.twin_models({**gpu.SMALL["small"], "tie_word_embeddings": tied}, torch.device("cpu"), torch.float32)
    expected = theirs.num_parameters() if tied else theirs.num_parameters(exclude_embeddings=True)
    assert gpu.matmul_params(ours) == expected
