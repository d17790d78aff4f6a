"""Every colabs/*.ipynb runs top to bottom on CPU (small settings through MAE_ST_NOTEBOOK_* variables)."""

import json
import pathlib
import sys

import nbclient
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colabs").glob("*.ipynb"))
# files a notebook must leave in MAE_ST_NOTEBOOK_OUT (notebooks not named here: image outputs only)
EXPECTED_FILES = {
    "reconstruction.ipynb": ["reconstruction.png", "reconstruction.gif", "reconstruction_figure.png",
                             "pretrain/model.json"],
    "finetune_and_features.ipynb": ["features_pca.png", "finetune_curves.png", "pretrain/model.json",
                                    "linear_probe/metrics.jsonl", "finetune_pretrained/metrics.jsonl",
                                    "finetune_scratch/metrics.jsonl", "finetune_pretrained/eval/results.json",
                                    "finetune_pretrained/eval/predictions.csv"],
}
KERNEL = "mae_st_jax_test"


def _kernel_manager(spec_dir: pathlib.Path) -> KernelManager:
    """A kernel of this interpreter (sys.executable), whatever python3 kernel spec is installed."""
    (spec_dir / KERNEL).mkdir(parents=True)
    (spec_dir / KERNEL / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "mae_st_jax tests", "language": "python"}))
    specs = KernelSpecManager(kernel_dirs=[str(spec_dir)], ensure_native_kernel=False)
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


def test_notebooks_exist():
    assert (ROOT / "colabs" / "reconstruction.ipynb") in NOTEBOOKS
    assert (ROOT / "colabs" / "finetune_and_features.ipynb") in NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("MAE_ST_NOTEBOOK_STEPS", "30")
    monkeypatch.setenv("MAE_ST_NOTEBOOK_OUT", str(out))
    monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device, as in a Colab CPU runtime (conftest asks for 8)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("MAE_ST_NOTEBOOK_CKPT", raising=False)
    monkeypatch.delenv("MAE_ST_NOTEBOOK_VIDEO", raising=False)
    nb = nbformat.read(path, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    work = tmp_path / "cwd"
    work.mkdir()
    client = nbclient.NotebookClient(nb, km=_kernel_manager(tmp_path / "kernels"), timeout=900,
                                     resources={"metadata": {"path": str(work)}})
    client.execute()  # raises CellExecutionError naming the cell on any error
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure shown"
    for name in EXPECTED_FILES.get(path.name, []):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
