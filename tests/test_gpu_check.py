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
    assert {r.get("batch") for r in saved["decoding"] if "batch" in r} == {1, 4}
    assert any("gsm8k_1319_prompts_s" in r for r in saved["decoding"])
    assert saved["end_to_end"]["returncode"] == 0, saved["end_to_end"]["tail"]
    assert saved["end_to_end"]["results"]["transfer_new"]["total"] == 8
    table = (tmp_path / "gpu.md").read_text()
    assert "| small |" in table and "end to end:" in table and report["minutes"] < 6
