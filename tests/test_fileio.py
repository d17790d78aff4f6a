"""Side files of a run at a URL workdir (gs:// on a pod): they go through tf.io.gfile, not to a local
folder named 'gs:'. TensorFlow's in-memory filesystem (ram://) stands in for a bucket here."""

import json
import os

import numpy as np
import tensorflow as tf
from PIL import Image

from mae_st_jax import evaluate, fileio
from mae_st_jax.train import loop
from mae_st_jax.train import logging as metrics_logging


def test_metrics_log_appends_truncates_and_reads_at_a_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a local fallback would show up here as ./ram:/...
    # CLU's TensorBoard writer goes through etils.epath, which knows gs:// but not ram://
    monkeypatch.setattr(metrics_logging.metric_writers, "create_default_writer",
                        lambda *a, **k: metrics_logging.metric_writers.LoggingWriter())
    workdir = "ram://bucket/run_metrics"
    fileio.makedirs(workdir)
    log = metrics_logging.MetricsLog(workdir)
    for step in (1, 2, 3):
        log.write(step, {"loss": 1.0 / step})
    log.close()
    assert [m["step"] for m in metrics_logging.read_metrics(workdir)] == [1, 2, 3]
    with tf.io.gfile.GFile(f"{workdir}/metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # torn
    metrics_logging.MetricsLog(workdir, resume_step=2).close()  # a resume from step 2
    assert [m["step"] for m in metrics_logging.read_metrics(workdir)] == [1, 2]
    assert not os.path.exists(tmp_path / "ram:")


def test_eval_outputs_figures_and_the_write_probe_at_a_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    directory = "ram://bucket/run_eval/eval"
    probs = np.asarray([[0.7, 0.3], [0.2, 0.8]], np.float32)
    source = type("S", (), {"info": lambda self, i: type("I", (), {"name": f"v{i}"})()})()
    evaluate.write_predictions(directory, source, probs, np.asarray([0, 0]), np.asarray([True, True]), [],
                               {"top1": 0.5})
    with tf.io.gfile.GFile(f"{directory}/probs.npy", "rb") as f:
        np.testing.assert_array_equal(np.load(f), probs)
    rows = fileio.read_text(f"{directory}/predictions.csv").splitlines()
    assert rows[0].startswith("index,name,label,pred") and rows[1].split(",")[:6] == ["0", "v0", "0", "0",
                                                                                    "0.700000", "1"]
    assert json.loads(fileio.read_text(f"{directory}/results.json")) == {"top1": 0.5}
    image = Image.fromarray(np.full((4, 6, 3), 200, np.uint8))
    fileio.save_image("ram://bucket/run_eval/r.png", image)
    with tf.io.gfile.GFile("ram://bucket/run_eval/r.png", "rb") as f:
        assert np.asarray(Image.open(f)).shape == (4, 6, 3)
    loop.check_writable("ram://bucket/run_eval")  # the probe object is written and removed
    assert tf.io.gfile.listdir("ram://bucket/run_eval/checkpoints") == []
    assert not os.path.exists(tmp_path / "ram:")
