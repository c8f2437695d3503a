"""Loading causal LMs from a local folder, a hub id or a GGUF file, and the TransformerLens
bridge over them.

A `.gguf` file is dequantized once into a cached HF folder (`workbench.engine.gguf`); its
sha256 and quantization type go to the manifest. Conventions: safetensors only (no pickled weights), `trust_remote_code` off unless asked,
offline mode (`HF_HUB_OFFLINE=1`) honoured with a clear error when a hub id is not cached,
dtype `auto` = bf16 on CUDA and fp32 on CPU, `device="auto"` = CUDA if present, and
accelerate's `device_map="auto"` when asked to spread a model over devices.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from workbench.engine.gguf import gguf_folder, is_gguf
from workbench.errors import ModelLoadError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class LoadedModel:
    """A model, its tokenizer, and what a manifest must record about them."""

    model: PreTrainedModel
    tokenizer: Any
    name: str
    """What the user passed (a folder or a hub id)."""
    revision: str | None
    """The hub commit hash, or None for a local folder."""
    dtype: torch.dtype
    device: torch.device
    """Where the inputs go (the first device for a model spread by device_map)."""
    source: dict[str, Any] = field(default_factory=dict)
    """Where the weights came from beyond `name` (a GGUF file's sha256 and quantization, a
    chat template supplied by file); recorded in manifests."""

    @property
    def max_length(self) -> int | None:
        cfg = self.model.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(cfg, key, None)
            if isinstance(value, int):
                return value
        return None

    def describe(self) -> dict[str, Any]:
        """The model part of a manifest."""
        cfg = self.model.config
        return {
            "name": self.name,
            "revision": self.revision,
            "architecture": (cfg.architectures or [type(self.model).__name__])[0],
            "model_type": cfg.model_type,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "n_parameters": sum(p.numel() for p in self.model.parameters()),
            "vocab_size": int(self.model.get_output_embeddings().weight.shape[0]),
            "bos_token_id": self.tokenizer.bos_token_id,
            **self.source,
        }


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(
            f"device {device!r} asked for but no CUDA device is visible",
            fix="use --device cpu, or run on a machine with a GPU",
        )
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(
            f"unknown dtype {dtype!r}", fix=f"use auto or one of: {', '.join(DTYPES)}"
        )
    return DTYPES[dtype]


def load_model(
    name_or_path: str | Path,
    *,
    dtype: str | torch.dtype = "auto",
    device: str = "auto",
    device_map: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    chat_template: str | Path | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode.

    `name_or_path`: a HF model folder, a hub id, or a `.gguf` file. `device_map="auto"` hands
    placement to accelerate (for models larger than one device); otherwise the whole model
    goes to `device`. `chat_template`: a Jinja chat template file that replaces the
    tokenizer's (for tokenizers that ship none).
    """
    name = str(name_or_path)
    source: dict[str, Any] = {}
    local = Path(name).expanduser()
    if is_gguf(name):
        folder, info = gguf_folder(local)
        source["gguf"] = info
        local = folder
    is_local = local.is_dir()
    if not is_local and (local.exists() or name.startswith((".", "/", "~"))):
        raise ModelLoadError(
            f"model folder {name!r} does not exist or is not a folder",
            fix="give a folder holding config.json and *.safetensors, or a hub id",
        )
    if is_local and not any(local.glob("*.safetensors")):
        raise ModelLoadError(
            f"{name}: no *.safetensors weights in the folder",
            fix="convert the weights to safetensors (the workbench never loads pickled weights)",
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    kwargs: dict[str, Any] = {
        "revision": revision,
        "trust_remote_code": trust_remote_code,
        "local_files_only": offline or is_local,
    }
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local) if is_local else name, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            str(local) if is_local else name,
            dtype=torch_dtype,
            use_safetensors=True,
            device_map=device_map,
            **kwargs,
        )
    except (OSError, ValueError) as err:
        hint = (
            "the hub is offline here (HF_HUB_OFFLINE=1): download the model elsewhere, "
            "copy its folder to this machine and pass the folder"
            if offline or not is_local
            else "check that the folder holds a complete HF model (config.json, tokenizer files)"
        )
        raise ModelLoadError(f"cannot load model {name!r}: {_first_line(err)}", fix=hint) from None
    if device_map is None:
        model.to(dev)  # type: ignore[arg-type]  # transformers' stub types .to() narrowly
    model.eval()
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out, so any id works; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    input_device = next(model.parameters()).device
    if chat_template is not None:
        file = Path(chat_template).expanduser()
        if not file.is_file():
            raise ModelLoadError(
                f"chat template file {str(chat_template)!r} does not exist",
                fix="give the path of a Jinja chat template file",
            )
        tokenizer.chat_template = file.read_text(encoding="utf-8")
        source["chat_template_file"] = str(file)
    rev = getattr(model.config, "_commit_hash", None) if not is_local else None
    return LoadedModel(model, tokenizer, name, rev, torch_dtype, input_device, source)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_bridge(lm: LoadedModel) -> Any:
    """A TransformerLens 4 `TransformerBridge` over the already-loaded HF model (no copy).

    Its hook names (`blocks.{l}.hook_resid_post`, ...) are the workbench's site names.
    Booting the bridge rewires `lm.model` in place (its blocks are wrapped): HF forward hooks
    registered on the old modules before this call no longer fire; register them after.
    Compatibility mode is deliberately *not* enabled: it folds LayerNorm and centers the
    unembedding, which changes the logits (docs/MEASUREMENT.md §5).
    """
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(
        lm.name,
        hf_model=lm.model,
        tokenizer=lm.tokenizer,
        device=str(lm.device),
        dtype=lm.dtype,
    )
