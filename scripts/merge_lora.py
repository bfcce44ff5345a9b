"""Folds an adapter into its base model and writes the result as a complete checkpoint directory: a LoRA adapter, or
a LLaMA-Adapter v2 one without prompts.

    python scripts/merge_lora.py --checkpoint_dir checkpoints/meta-llama/Llama-2-7b-hf \
        --lora_path out/lora/alpaca/lit_model_lora_finetuned.safetensors --out_dir checkpoints/Llama-2-7b-alpaca

The directory (lit_model.safetensors, model_config.json, the base's tokenizer files) loads with generate.py like any
base checkpoint and generates at the base model's speed. With `--format hf` it is a Hugging Face directory instead
(config.json, model.safetensors, the tokenizer's files), as scripts/convert_lit_checkpoint.py writes it, for
transformers and vLLM. The adapter's settings (r, alpha, targets, rsLoRA, DoRA, per-module ranks) are read from the
adapter itself; a DoRA adapter merges into plain weights too (W = m / ‖W + ΔW‖ · (W + ΔW)). Memory: one copy of the
model; ΔW is added to each weight in place, one layer at a time.

With `--adapter_path` a LLaMA-Adapter v2 checkpoint trained with adapter_layers 0 (adapter.py) merges instead: each
projection's scale and bias fold into its weight and a bias (W' = scale ⊙ W, b' = scale ⊙ bias; the checkpoint's
config then has attention_bias and mlp_bias, as a Hugging Face LLaMA can), its norms replace the base's. A
LLaMA-Adapter prompt (v1, or v2 with adapter_layers above 0) is attention over learned keys and values, not a change of
any weight, and cannot merge: refused.
"""

import sys
from pathlib import Path
from typing import Literal, Optional

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent.parent))  # run from anywhere without installing the repo
sys.path.insert(0, str(Path(__file__).parent))
from adapter import load_adapter_model, merge_adapter_v2, read_adapter_config
from convert_lit_checkpoint import save_hf_checkpoint
from lora import load_lora_model, merged_state_dict, read_lora_config
from utils import atomic_path, check_checkpoint_dir, cli, copy_tokenizer


def merge_lora(
    checkpoint_dir: Path = Path("checkpoints/meta-llama/Llama-2-7b-hf"),
    lora_path: Optional[Path] = None,
    out_dir: Path = Path("checkpoints/Llama-2-7b-alpaca"),
    format: Literal["lit", "hf"] = "lit",
    adapter_path: Optional[Path] = None,
) -> None:
    """Writes the base model of `checkpoint_dir` with the adapter at `lora_path` (or `adapter_path`) merged in, to
    `out_dir`.

    Args:
        checkpoint_dir: the base checkpoint the adapter was trained on (as converted by
            scripts/convert_hf_checkpoint.py).
        lora_path: the LoRA checkpoint written by finetune_lora.py.
        out_dir: the new checkpoint directory; created if needed, and it must not be `checkpoint_dir`.
        format: "lit" for a checkpoint directory of this repository, "hf" for a Hugging Face directory
            (scripts/convert_lit_checkpoint.py's output).
        adapter_path: a LLaMA-Adapter v2 checkpoint without prompts (adapter_layers 0) to merge instead of
            --lora_path.
    """
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    check_checkpoint_dir(checkpoint_dir)
    if out_dir.resolve() == checkpoint_dir.resolve():
        raise ValueError(f"--out_dir {out_dir} is the base checkpoint directory; choose a new directory")
    if format not in ("lit", "hf"):
        raise ValueError(f"--format must be lit or hf, not {format!r}")
    if (lora_path is None) == (adapter_path is None):
        raise ValueError("pass either --lora_path (a LoRA checkpoint) or --adapter_path (a LLaMA-Adapter v2 one)")
    if lora_path is not None:
        read_lora_config(lora_path)  # a missing file or one of another kind stops here, before the slow part
        model = load_lora_model(checkpoint_dir, lora_path, merge=True)
    else:
        adapter_config, _ = read_adapter_config(adapter_path)
        if adapter_config.adapter_layers:
            raise ValueError(
                f"{adapter_path} holds LLaMA-Adapter prompts (v{adapter_config.version}, in "
                f"{adapter_config.adapter_layers} layers), which are attention over learned keys and values, not a "
                "change of any weight, and cannot merge; generate with it unmerged (generate_adapter.py)"
            )
        model = merge_adapter_v2(load_adapter_model(checkpoint_dir, adapter_path))

    state_dict = merged_state_dict(model)
    if format == "hf":
        layout = {name: (tuple(t.shape), t.dtype) for name, t in state_dict.items()}
        save_hf_checkpoint(model.config, layout, state_dict.items(), checkpoint_dir, out_dir)
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "lit_model.safetensors") as tmp:
        save_file(state_dict, tmp, metadata={"format": "pt"})  # written from the model's own memory
    with atomic_path(out_dir / "model_config.json") as tmp:
        model.config.to_file(tmp)
    names = copy_tokenizer(checkpoint_dir, out_dir)
    print(f"Wrote {out_dir} (lit_model.safetensors, model_config.json, {', '.join(names)})", file=sys.stderr)


if __name__ == "__main__":
    cli(merge_lora)
