"""Slow: Qwen2.5-VL at the 7B's real widths (2 decoder layers) against transformers 4.51.3, through
bench/qwen2_5_vl_real_dims.py (torch side in .venv-ref, then ppiad; ~9 GB fp32 each, one after the other).
Skips when the reference virtualenv, ../shared's tokenizer or the memory is missing."""
import json
import os
import subprocess
import sys

import pytest

from tests import conftest

BENCH = os.path.join(conftest.ROOT, "bench", "qwen2_5_vl_real_dims.py")


@pytest.mark.slow
def test_real_width_logits_match_transformers(tmp_path):
    conftest.require_shared(conftest.QWEN2_TOKENIZER_DIR)
    conftest.require_ref_python()
    proc = subprocess.run([sys.executable, BENCH, "--size", "7b", "--layers", "2", "--work", str(tmp_path),
                           "--min-available-gb", "12"], capture_output=True, text=True, timeout=3600)
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode == 3:
        pytest.skip(f"not enough memory: {lines[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = lines[-1]
    assert result["side"] == "ppiad" and result["input_ids_equal"] and result["logits_rel_err"] <= 1e-3
