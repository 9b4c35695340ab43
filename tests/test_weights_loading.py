"""Loading converts each tensor straight from the mapped file into the parameter: values exact for
bf16/fp32/fp16 and transposed linear weights larger than one copy tile, and memory within 1.2x the model."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ppiad.models import weights as W

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("dtype", ["BF16", "F32", "F16"])
@pytest.mark.parametrize("transpose", [False, True])
def test_copy_into_matches_the_plain_conversion(tmp_path, dtype, transpose):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(700, 300)).astype(np.float32)  # both sides above TILE: the tiled path runs
    stored = x.astype(np.float16) if dtype == "F16" else x
    path = str(tmp_path / "x.safetensors")
    W.save_safetensors(path, {"x": stored}, bf16_names=frozenset({"x"}) if dtype == "BF16" else frozenset())
    st = W.SafetensorsFile(path)
    assert st.entries["x"]["dtype"] == dtype
    want = st.get("x").astype(np.float32)
    want = want.T if transpose else want
    dst = np.full(want.shape, np.nan, np.float32)
    st.source("x").copy_into(dst, transpose=transpose)
    np.testing.assert_array_equal(dst, want)
    if dtype == "BF16":
        np.testing.assert_array_equal(want, W.bf16_to_float32(W.float32_to_bf16(x)).T if transpose else
                                      W.bf16_to_float32(W.float32_to_bf16(x)))


def test_copy_into_rejects_a_wrong_destination(tmp_path):
    path = str(tmp_path / "x.safetensors")
    W.save_safetensors(path, {"x": np.zeros((3, 4), np.float32)})
    src = W.SafetensorsFile(path).source("x")
    with pytest.raises(ValueError, match="'x' has shape"):
        src.copy_into(np.zeros((3, 4), np.float32), transpose=True)
    with pytest.raises(TypeError):
        src.copy_into(np.zeros((3, 4), np.float64))


def test_truncated_file_is_named(tmp_path):
    path = str(tmp_path / "x.safetensors")
    W.save_safetensors(path, {"x": np.ones((64, 64), np.float32)})
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(W.CheckpointError, match=r"x.safetensors.*'x' lies outside the file"):
        W.SafetensorsFile(path)


def _medium_checkpoint(tmp_path, bf16: bool) -> str:
    from ppiad.models.qwen2_vl import Qwen2VLForConditionalGeneration
    from ppiad.models.tiny import build_tiny_checkpoint

    d = build_tiny_checkpoint(str(tmp_path / "m"), seed=0, weights=False, hidden_size=320, layers=3, heads=4,
                              kv_heads=2, intermediate_size=2560, vision_embed_dim=64)
    import paddle

    paddle.seed(1)
    from ppiad.models.qwen2_vl import Qwen2VLConfig

    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_file(os.path.join(d, "config.json")))
    tensors = model.hf_state_dict()
    W.save_sharded(d, tensors, max_shard_bytes=2_000_000,
                   bf16_names=frozenset(tensors) if bf16 else frozenset())
    return d


@pytest.mark.parametrize("bf16", [True, False])
def test_loaded_parameters_equal_the_file(tmp_path, bf16):
    from ppiad.models.qwen2_vl import Qwen2VLForConditionalGeneration

    d = _medium_checkpoint(tmp_path, bf16)
    model = Qwen2VLForConditionalGeneration.from_pretrained(d)
    want = dict(W.iter_tensors(*W.find_weights(d)))
    state = model.state_dict()
    assert set(state) <= set(want)
    for name, p in state.items():  # the model keeps the file's layout: no transposition anywhere
        np.testing.assert_array_equal(p.numpy(), want[name], err_msg=name)
    assert model.model.layers[0].mlp.up_proj.weight.shape == [2560, 320]  # [out, in], as in the file


MEMORY_PROBE = """
import json, sys
from ppiad.models.qwen2_vl import Qwen2VLForConditionalGeneration
import paddle
def rss(field="VmRSS:"):  # VmHWM = peak RSS of this program (ru_maxrss would include the parent's, from fork)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field))
paddle.nn.Linear(64, 64)(paddle.ones([2, 64])).numpy()  # Paddle's one-off start-up memory, before measuring
before = rss()
model = Qwen2VLForConditionalGeneration.from_pretrained(sys.argv[1])
peak = rss("VmHWM:")
size = sum(int(p.numel()) * 4 for p in model.parameters())
print(json.dumps({"before": before, "peak": peak, "after": rss(), "model": size}))
"""


def test_loading_peak_memory_stays_near_the_model_size(tmp_path):
    # the file (fp32 here, as large as the model) must not stay mapped in the process while loading
    d = _medium_checkpoint(tmp_path, bf16=False)
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, d], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert m["model"] > 20e6
    assert m["peak"] - m["before"] <= 1.2 * m["model"] + 2e6, m  # before the fix: 1.45x


@pytest.mark.parametrize("transpose", [False, True])
def test_large_tensor_copied_in_parallel_bands_is_exact(tmp_path, transpose):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2100, 2100)).astype(np.float32)  # above BAND_ROWS and 4M elements: the thread pool runs
    assert x.shape[0] > W.BAND_ROWS and x.size >= 1 << 22
    path = str(tmp_path / "x.safetensors")
    W.save_safetensors(path, {"x": x}, bf16_names=frozenset({"x"}))
    st = W.SafetensorsFile(path)
    want = st.get("x").T if transpose else st.get("x")
    dst = np.full(want.shape, np.nan, np.float32)
    st.source("x").copy_into(dst, transpose=transpose)
    np.testing.assert_array_equal(dst, want)


def test_many_tensors_copied_together_are_exact_and_each_released_once(tmp_path, monkeypatch):
    # copy_many runs the bands of all tensors on the pool; each tensor's file pages are dropped once, after
    # its last band, never before (a band that reads released pages would still read the right bytes from
    # the page cache, so count the calls instead)
    rng = np.random.default_rng(2)
    xs = {f"x{i}": rng.normal(size=shape).astype(np.float32)
          for i, shape in enumerate([(2100, 2100), (5, 7), (1500, 3000), (64,)])}
    path = str(tmp_path / "x.safetensors")
    W.save_safetensors(path, xs, bf16_names=frozenset({"x0", "x2"}))
    st = W.SafetensorsFile(path)
    released = []
    monkeypatch.setattr(st, "release", lambda name: released.append(name))
    jobs, want = [], {}
    for name, x in xs.items():
        transpose = x.ndim == 2 and name != "x1"
        want[name] = st.get(name).T if transpose else st.get(name)
        jobs.append((st.source(name), np.full(want[name].shape, np.nan, np.float32), transpose))
    W.copy_many(jobs)
    for (source, dst, _), name in zip(jobs, xs):
        np.testing.assert_array_equal(dst, want[name])
    assert sorted(released) == sorted(xs)


def test_copy_many_checks_every_destination_before_copying(tmp_path):
    path = str(tmp_path / "x.safetensors")
    W.save_safetensors(path, {"a": np.ones((3, 4), np.float32), "b": np.ones((2, 2), np.float32)})
    st = W.SafetensorsFile(path)
    first = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="'b' has shape"):
        W.copy_many([(st.source("a"), first, False), (st.source("b"), np.zeros((3, 3), np.float32), False)])
    assert not first.any()  # nothing was written: the bad job was found first
