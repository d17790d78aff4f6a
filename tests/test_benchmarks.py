"""Benchmarks: no TensorFlow on the import path, and the FLOP model against REFERENCE.md's figures."""

import subprocess
import sys

import pytest

from conftest import ROOT


def test_benchmarks_import_no_tensorflow_or_clu():
    code = ("import sys; import benchmarks.train_step, benchmarks.masking_speedup; "
            "bad = [m for m in ('tensorflow', 'clu', 'tensorflow_datasets') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


@pytest.mark.parametrize("size,ratio,visible,expected,tol", [
    ("vit_b", 0.9, 156, 0.28, 0.05),   # REFERENCE.md counts the patch embed on all 1568 patches;
    ("vit_l", 0.9, 156, 0.49, 0.05),   # we embed only the visible ones, hence a few % lower
    ("vit_h", 0.9, 156, 0.81, 0.05),
    ("vit_l", 0.0, 1568, 3.77, 0.01),
])
def test_train_flops_match_reference_table(size, ratio, visible, expected, tol):
    from benchmarks import common
    c = common.make_config(size, 16, 224, 1, ratio if ratio > 0 else 0.5, "float32")
    tflop = common.train_flops_per_clip(c.model, visible) / 1e12
    assert tflop == pytest.approx(expected, rel=tol)
    assert tflop <= expected * 1.001  # never more than the reference's count
