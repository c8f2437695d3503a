"""Model loading through the normal path: local folders, dtypes, and clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from workbench.cli import main
from workbench.engine.models import load_model, resolve_dtype
from workbench.errors import ModelLoadError


def test_local_folder_loads_in_eval_mode_with_recorded_identity(tiny_llama_dir: Path) -> None:
    lm = load_model(tiny_llama_dir, dtype="float32", device="cpu")
    assert not lm.model.training
    assert lm.dtype == torch.float32 and lm.device.type == "cpu"
    info = lm.describe()
    assert info["model_type"] == "llama" and info["dtype"] == "float32"
    assert info["n_parameters"] == sum(p.numel() for p in lm.model.parameters())
    assert lm.max_length == 1024


def test_dtype_auto_is_float32_on_cpu_and_explicit_bf16_works(tiny_gpt2_dir: Path) -> None:
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    lm = load_model(tiny_gpt2_dir, dtype="bfloat16", device="cpu")
    assert next(lm.model.parameters()).dtype == torch.bfloat16


def test_device_map_auto_goes_through_accelerate(tiny_llama_dir: Path) -> None:
    spread = load_model(tiny_llama_dir, dtype="float32", device_map="auto")
    plain = load_model(tiny_llama_dir, dtype="float32", device="cpu")
    ids = torch.tensor([[1, 40, 41, 42]])
    with torch.no_grad():
        assert torch.equal(spread.model(ids).logits, plain.model(ids).logits)
    assert spread.device.type == "cpu"  # no GPU here: accelerate places everything on the CPU


def test_offline_hub_id_that_is_not_cached_gives_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError) as err:
        load_model("some-org/not-a-cached-model", device="cpu")
    assert "offline" in err.value.fix
    assert "some-org/not-a-cached-model" in str(err.value)


def test_folder_without_safetensors_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_llama_dir, folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(folder, device="cpu")


@pytest.mark.parametrize("bad", ["/no/such/model", "./missing-folder"])
def test_missing_folder_cli_exit_code_and_no_traceback(
    bad: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    study = Path(__file__).resolve().parents[2] / "probes" / "example.yaml"
    code = main(
        ["distributions", str(study), "--model", bad, "--out", str(tmp_path / "o"), "--quiet"]
    )
    err = capsys.readouterr().err
    assert code == 3
    assert "does not exist" in err and "fix:" in err and "Traceback" not in err


def test_unknown_dtype_and_missing_cuda(tiny_llama_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(tiny_llama_dir, dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA"):
            load_model(tiny_llama_dir, device="cuda")
