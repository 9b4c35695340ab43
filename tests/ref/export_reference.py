"""Reference outputs for tests/test_export.py: transformers 4.51.3 and PEFT on ppiad's exported folder and adapter.

Runs ONLY in the reference virtualenv (.venv-ref: torch + transformers 4.51.3 + peft), as a subprocess:
    python export_reference.py SPEC.json OUT.npz
SPEC: {"exported": [folder, ...], "base": base folder, "adapter": adapter folder, "image": png, "prompt": text}
Everything is loaded the way a user of transformers would: AutoProcessor / Qwen2VLForConditionalGeneration
.from_pretrained on the exported folders as they are, PeftModel.from_pretrained(base, adapter) for the adapter.
OUT.npz: the processor's input_ids / attention_mask / pixel_values / image_grid_thw (of the first exported
folder), logits_<i> for each exported folder (float32 compute), logits_peft, and a JSON "meta".
"""
import json
import sys

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration


def logits_of(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits[0].float().numpy()


def main(spec_path, out_path):
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    torch.manual_seed(0)
    processor = AutoProcessor.from_pretrained(spec["exported"][0])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": spec["prompt"]}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.open(spec["image"]).convert("RGB")], return_tensors="pt")
    out = {k: inputs[k].numpy() for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    meta = {"text": text, "processor": type(processor).__name__, "dtypes": []}
    for i, folder in enumerate(spec["exported"]):
        model = Qwen2VLForConditionalGeneration.from_pretrained(folder, torch_dtype="auto")  # config.json's dtype
        meta["dtypes"].append(str(next(model.parameters()).dtype))
        out[f"logits_{i}"] = logits_of(model.float().eval(), inputs)
    from peft import PeftModel

    base = Qwen2VLForConditionalGeneration.from_pretrained(spec["base"], torch_dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, spec["adapter"]).eval()
    meta["peft_adapted_layers"] = sum(1 for n, _ in peft_model.named_modules() if n.endswith("lora_A.default"))
    out["logits_peft"] = logits_of(peft_model, inputs)
    out["meta"] = np.array(json.dumps(meta))
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
