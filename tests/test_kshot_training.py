"""GRPO training with k-shot prompts (issue 17): every rollout prompt holds k normal references of its
category, then the query, and the step trains (the tiny model, one optimizer step)."""
import json
import os

import numpy as np

from tests.test_trainer import assets, tiny_overrides, varied_rewards  # noqa: F401  (fixtures)


def test_one_grpo_step_with_one_reference(assets, tmp_path, varied_rewards, monkeypatch):  # noqa: F811
    from ppiad.config import load_config
    from ppiad.models.processor import Qwen2VLProcessor
    from ppiad.rl.trainer import GRPOTrainer

    seen = []
    real = Qwen2VLProcessor.build_inputs

    def spy(self, images, object_names, return_tensors="pd", references=None):
        out = real(self, images, object_names, return_tensors, references=references)
        seen.append(([len(r) for r in references], (out["input_ids"] == self.tokenizer.token_to_id("<|vision_start|>")).astype("int64").sum(1).numpy()))
        return out

    monkeypatch.setattr(Qwen2VLProcessor, "build_inputs", spy)
    cfg = load_config(None, tiny_overrides(assets, str(tmp_path), "kshot", "train.max_steps=1",
                                           "prompt.reference_images=1", "grpo.beta=0"))
    trainer = GRPOTrainer(cfg)
    summary = trainer.train()
    assert summary["step"] == 1
    assert seen and all(k == [1] * len(k) for k, _ in seen)
    assert all((starts == 2).all() for _, starts in seen)   # reference + query in every prompt
    pool = trainer.references
    assert pool.k == 1 and all(os.sep + "good" + os.sep in p for p in pool.all_paths())
    with open(os.path.join(str(tmp_path), "kshot", "metrics.jsonl")) as f:
        assert np.isfinite(float(json.loads(f.readline())["loss"]))
