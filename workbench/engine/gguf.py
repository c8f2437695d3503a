"""GGUF checkpoints (what users of local models mostly have), read through transformers.

transformers dequantizes a GGUF file into an ordinary PyTorch model (through the `gguf`
package), but it parses the file twice and slowly (about 30 s for a 135M model on a busy CPU)
and keeps a GGUF quantizer on the model, so the result cannot be saved. The workbench does
the conversion once per file: the dequantized float32 weights, the tokenizer (with the chat
template the file carries) and the config are saved as an ordinary HF folder under
`$WORKBENCH_CACHE/gguf/<sha256>/`, and every later load reads that folder in a second or two.
The numbers are those of transformers' own dequantization; the chosen dtype is applied when
the folder is loaded.

What a manifest records of the file: its name, size, sha256, the GGUF file type
(`MOSTLY_Q4_1`, ...), the count of each tensor quantization type, and whether it carried a
chat template.
"""

from __future__ import annotations

import collections
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from workbench.errors import ModelLoadError
from workbench.runs import cache_root, write_json

INFO_FILE = "gguf.json"


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def gguf_info(path: Path, sha256: str | None = None) -> dict[str, Any]:
    """What the file is: quantization, architecture, whether it carries a chat template."""
    try:
        from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType
    except ImportError:  # pragma: no cover - a dependency of the workbench
        raise ModelLoadError(
            "reading GGUF files needs the `gguf` package", fix="pip install gguf"
        ) from None
    try:
        reader = GGUFReader(path)
    except Exception as err:
        raise ModelLoadError(
            f"{path}: not a readable GGUF file ({type(err).__name__}: {err})",
            fix="check the file (a partial download?), or pass a HF model folder",
        ) from None

    def field(key: str) -> Any:
        f = reader.fields.get(key)
        if f is None:
            return None
        return f.contents()

    file_type = field("general.file_type")
    try:
        file_type_name = LlamaFileType(int(file_type)).name if file_type is not None else None
    except ValueError:
        file_type_name = str(file_type)
    types = collections.Counter(GGMLQuantizationType(t.tensor_type).name for t in reader.tensors)
    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        "sha256": sha256 or sha256_file(path),
        "architecture": field("general.architecture"),
        "file_type": file_type_name,
        "tensor_types": dict(sorted(types.items())),
        "has_chat_template": "tokenizer.chat_template" in reader.fields,
    }


def gguf_folder(path: str | Path, *, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """The HF folder holding this GGUF file's dequantized model (made on first use), and the
    file's info for the manifest."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ModelLoadError(
            f"GGUF file {str(path)!r} does not exist",
            fix="check the path of the .gguf file",
        )
    sha = sha256_file(file)
    folder = cache_root() / "gguf" / sha[:16]
    info_file = folder / INFO_FILE
    if info_file.is_file():
        return folder, json.loads(info_file.read_text())
    info = gguf_info(file, sha)
    if progress:
        print(
            f"converting {file.name} ({info['file_type']}) to an HF folder in {folder} "
            "(once per file; later loads take seconds)",
            file=sys.stderr,
        )
    _convert(file, folder, info)
    return folder, info


def _convert(file: Path, folder: Path, info: dict[str, Any]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
        model = AutoModelForCausalLM.from_pretrained(
            file.parent, gguf_file=file.name, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(
            f"cannot read GGUF file {str(file)!r}: {str(err).strip().splitlines()[0]}",
            fix="transformers reads the GGUF architectures it supports (Llama, Mistral, Qwen2, "
            "Gemma 2/3, Phi-3, GPT-2, ...); for another one, convert the model to a HF folder",
        ) from None
    # The weights are plain float32 tensors now; the quantizer only blocks saving them.
    del model.hf_quantizer
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    write_json(tmp / INFO_FILE, info)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
