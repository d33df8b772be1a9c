"""The notebooks in examples/notebooks run top to bottom (nbclient) offline on the tiny model (``DI_STAR_TINY=1``)."""

from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient", reason="running notebooks needs nbclient: pip install -e '.[demo]'")
nbformat = pytest.importorskip("nbformat", reason="running notebooks needs nbformat: pip install -e '.[demo]'")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "examples" / "notebooks"


def _execute(name: str, tmp_path, monkeypatch):
    for variable, value in {"DI_STAR_TINY": "1", "DI_STAR_OUT": str(tmp_path), "HF_HUB_OFFLINE": "1",
                            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(variable, value)  # the kernel (and the trainer it starts) inherit these
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), "store notebooks without outputs"
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    outputs = [output for cell in code for output in cell.outputs]
    text = "".join(output.get("text", "") + output.get("data", {}).get("text/plain", "") for output in outputs)
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    return text, images


def test_quickstart_runs_offline_on_the_tiny_model(tmp_path, monkeypatch):
    text, images = _execute("quickstart", tmp_path, monkeypatch)
    assert "image size: (64, 64)" in text and "seed 0 reproduces: True" in text
    assert "scale 0 equals no LoRA: True" in text and "scale 1 changes the image: True" in text
    assert "torch.bfloat16 vs torch.float32: mean pixel difference" in text
    assert (tmp_path / "comfyui" / "di-star.safetensors").stat().st_size > 0
    assert len(images) == 4  # the image, the batch grid, the precision pair, the LoRA scales


def test_train_lora_notebook_trains_and_shows_the_pictures(tmp_path, monkeypatch):
    text, images = _execute("train_lora", tmp_path, monkeypatch)
    assert "validation: ['progression.png', 'step-1', 'step-2'] progression: (128, 128)" in text
    assert "](validation/progression.png)" in text and "the LoRA changed the image: True" in text
    assert (tmp_path / "di-star-lora" / "pytorch_lora_weights.safetensors").is_file()
    assert len(images) == 2  # the progression, the before/after pair
