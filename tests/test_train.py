"""Sharded step vs one device, checkpoint round trips, exact resume and the end-to-end loop."""

import json
import os

import jax
import numpy as np
import pytest

from mae_st_jax import config_lib
from mae_st_jax.data import pipeline
from mae_st_jax.train import checkpoint, optim, pretrain, sharding as shd, step as step_lib
from mae_st_jax.train.logging import read_metrics


def _run_steps(config, devices, num_steps=2):
    """Losses, grad norms and final params of `num_steps` steps on a mesh over `devices`."""
    mesh = shd.make_mesh(config.mesh, devices=devices)
    tx, schedule = optim.make_optimizer(config, 8, 2)
    graphdef, state, state_sh = step_lib.create_state(lambda r: pretrain.build_model(config, r), tx, mesh, config)
    train_step = step_lib.make_pretrain_step(graphdef, tx, schedule, mesh, config, state_sh)
    loader = pipeline.ClipLoader(pipeline.make_source(config), config)
    batch_sh = {"video": shd.batch_sharding(mesh, 6)}
    losses, norms = [], []
    for s in range(num_steps):
        state, m = train_step(state, pipeline.to_global(loader.batch(s), batch_sh))
        losses.append(float(m["loss"]))
        norms.append(float(m["grad_norm"]))
    return np.array(losses), np.array(norms), state


@pytest.mark.parametrize("mesh,param_sharding,accum", [
    ({"data": 8, "fsdp": 1}, "replicate", 1),
    ({"data": 2, "fsdp": 4}, "fsdp", 1),
    ({"data": 1, "fsdp": 8}, "fsdp", 2),
])
def test_sharded_step_matches_single_device(tiny_config, mesh, param_sharding, accum):
    assert jax.device_count() == 8
    tiny_config.batch_size = 16
    tiny_config.grad_accum_steps = accum
    ref_loss, ref_norm, ref_state = _run_steps(tiny_config, jax.devices()[:1])
    tiny_config.mesh.update(mesh)
    tiny_config.param_sharding = param_sharding
    tiny_config.fsdp_min_size = 1024  # the tiny model's matrices are small
    loss, norm, state = _run_steps(tiny_config, jax.devices())
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(norm, ref_norm, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(ref_state["params"])):
        # Adam turns float-rounding differences of near-zero gradients into ~lr-sized steps
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    if param_sharding == "fsdp":  # large matrices really are split: each device holds 1/fsdp
        q = state["params"]["blocks"][0]["attn"]["q"]["kernel"]  # [E, E]
        fsdp = tiny_config.mesh.fsdp
        assert q.addressable_shards[0].data.size * fsdp == q.size
        mu = state["opt_state"].mu["blocks"][0]["attn"]["q"]["kernel"]
        assert mu.addressable_shards[0].data.size * fsdp == mu.size


def test_grad_accumulation_matches_one_big_batch(tiny_config):
    tiny_config.batch_size = 16
    one, _, _ = _run_steps(tiny_config, jax.devices()[:1])
    tiny_config.grad_accum_steps = 2
    two, _, _ = _run_steps(tiny_config, jax.devices()[:1])
    # same clips, same masks per micro-batch: the mean of the two halves equals the full batch loss
    np.testing.assert_allclose(one[0], two[0], rtol=0, atol=0.2)  # different masks: loose
    assert np.all(np.isfinite(two))


def test_state_checkpoint_round_trip(tiny_config, tmp_path):
    mesh = shd.make_mesh(tiny_config.mesh)
    tx, _ = optim.make_optimizer(tiny_config, 8, 2)
    _, state, state_sh = step_lib.create_state(lambda r: pretrain.build_model(tiny_config, r), tx, mesh, tiny_config)
    mgr = checkpoint.manager(str(tmp_path), async_save=True)
    checkpoint.save_state(mgr, 7, state)
    mgr.wait_until_finished()
    assert mgr.latest_step() == 7
    restored = checkpoint.restore_state(mgr, 7, step_lib.abstract_with_shardings(state, state_sh))
    mgr.close()
    flat_a = jax.tree_util.tree_leaves_with_path(state)
    flat_b = jax.tree_util.tree_leaves_with_path(restored)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (_, a), (_, b) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.sharding == b.sharding
    checkpoint.save_params(str(tmp_path / "p"), jax.device_get(state["params"]), tiny_config.model.to_dict())
    params, model_config = checkpoint.load_params(str(tmp_path / "p"))
    assert model_config["embed_dim"] == tiny_config.model.embed_dim
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_train_writes_outputs_and_resumes_bit_exactly(tiny_config, tmp_path):
    tiny_config.total_steps = 6
    tiny_config.write_reconstruction = True
    straight = tmp_path / "straight"
    pretrain.train(tiny_config, str(straight))
    full = {m["step"]: m["loss"] for m in read_metrics(str(straight))}
    assert sorted(full) == [1, 2, 3, 4, 5, 6]
    assert sorted(os.listdir(straight / "checkpoints")) == ["2", "4", "6"]
    assert (straight / "reconstruction.png").stat().st_size > 0
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(straight))
    assert json.loads((straight / "model.json").read_text())["embed_dim"] == tiny_config.model.embed_dim

    resumed = tmp_path / "resumed"
    tiny_config.total_steps = 3  # stops after step 3; the checkpoint at step 2 is the last but one
    tiny_config.write_reconstruction = False
    pretrain.train(tiny_config, str(resumed))
    first = {m["step"]: m["loss"] for m in read_metrics(str(resumed))}
    assert [first[s] for s in (1, 2, 3)] == [full[s] for s in (1, 2, 3)]
    tiny_config.total_steps = 6
    pretrain.train(tiny_config, str(resumed))  # resumes from step 3 (saved at the end of the first run)
    second = {m["step"]: m["loss"] for m in read_metrics(str(resumed))}
    assert sorted(second) == [1, 2, 3, 4, 5, 6]
    for s in (4, 5, 6):  # bit-identical, not approximately equal
        assert second[s] == full[s], (s, second[s], full[s])


def test_metrics_after_checkpoint_are_replaced_on_resume(tiny_config, tmp_path):
    tiny_config.total_steps = 2
    pretrain.train(tiny_config, str(tmp_path))
    with open(tmp_path / "metrics.jsonl", "a") as f:  # a step logged after the last checkpoint
        f.write(json.dumps({"step": 3, "loss": 123.0}) + "\n")
    tiny_config.total_steps = 3
    pretrain.train(tiny_config, str(tmp_path))
    steps = [m["step"] for m in read_metrics(str(tmp_path))]
    assert steps == [1, 2, 3]
    assert read_metrics(str(tmp_path))[-1]["loss"] != 123.0


def test_init_from_params_checkpoint(tiny_config, tmp_path):
    tiny_config.total_steps = 2
    pretrain.train(tiny_config, str(tmp_path / "a"))
    params, _ = checkpoint.load_params(str(tmp_path / "a"))  # a workdir: its latest step
    tiny_config.init_from = str(tmp_path / "a")
    tiny_config.total_steps = 1
    mesh = shd.make_mesh(tiny_config.mesh)
    tx, _ = optim.make_optimizer(tiny_config, 8, 2)
    _, state, _ = step_lib.create_state(lambda r: pretrain.build_model(tiny_config, r), tx, mesh,
                                        tiny_config, params=params)
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert int(state["step"]) == 0


def test_data_is_a_function_of_seed_and_step(tiny_config):
    source = pipeline.make_source(tiny_config)
    a = pipeline.ClipLoader(source, tiny_config).batch(3)
    b = pipeline.ClipLoader(source, tiny_config).batch(3)
    np.testing.assert_array_equal(a["video"], b["video"])
    c = pipeline.ClipLoader(source, tiny_config).batch(4)
    assert not np.array_equal(a["video"], c["video"])
    # two hosts read disjoint halves that together are the one-host batch
    halves = [pipeline.ClipLoader(source, tiny_config, process_index=i, process_count=2).batch(3) for i in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([h["video"] for h in halves], axis=1), a["video"])
    # repeat_aug: consecutive clip slots come from the same video
    assert np.all(a["label"][0, 0::2] == a["label"][0, 1::2])


def test_nonfinite_loss_stops_with_step(tiny_config, tmp_path):
    tiny_config.optim.lr = 1e30
    tiny_config.optim.clip_grad = 0.0
    tiny_config.total_steps = 4
    with pytest.raises(FloatingPointError, match="step"):
        pretrain.train(tiny_config, str(tmp_path))


def test_config_error_is_raised_before_compiling(tiny_config, tmp_path):
    tiny_config.batch_size = 6
    with pytest.raises(config_lib.ConfigError, match="batch_size"):
        pretrain.train(tiny_config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_relative_workdir(tiny_config, tmp_path, monkeypatch):
    """The README's demo writes to a relative workdir (workdirs/demo); Orbax needs absolute paths."""
    monkeypatch.chdir(tmp_path)
    tiny_config.total_steps = 2
    pretrain.train(tiny_config, "workdirs/rel")
    assert sorted(os.listdir(tmp_path / "workdirs" / "rel" / "checkpoints")) == ["2"]
    params, _ = checkpoint.load_params("workdirs/rel")
    assert jax.tree.leaves(params)


def test_a_checkpoints_metadata_and_the_train_state_are_compared_by_leaf_names(tiny_config, tmp_path):
    """The metadata has dicts keyed '0', '1', ... where the state has an AdamWState and int keys: compared by
    names they match (as key paths every leaf differed, and any failed restore was said not to fit the state)."""
    mesh = shd.make_mesh(tiny_config.mesh)
    tx, _ = optim.make_optimizer(tiny_config, 8, 2)
    _, state, _ = step_lib.create_state(lambda r: pretrain.build_model(tiny_config, r), tx, mesh, tiny_config)
    mgr = checkpoint.manager(str(tmp_path), async_save=False)
    checkpoint.save_state(mgr, 1, state)
    target = jax.tree.map(lambda x: x, dict(checkpoint._state_target(mgr, 1)))
    mgr.close()
    assert checkpoint.tree_mismatches(target, state) == []
    q = state["params"]["blocks"][0]["attn"]["q"]["kernel"]
    target["params"]["blocks"]["0"]["attn"]["q"]["kernel"] = np.zeros((q.shape[0], q.shape[1] + 1), np.float32)
    del target["opt_state"]["count"]
    assert checkpoint.tree_mismatches(target, state) == [
        "missing opt_state/count",
        f"params/blocks/0/attn/q/kernel: checkpoint {(q.shape[0], q.shape[1] + 1)} vs model {tuple(q.shape)}"]


def test_processes_that_list_different_checkpoints_stop_in_one_line(tiny_config, tmp_path, monkeypatch):
    """Another process listing other steps (its workdir is on storage of its own) stops the run at start."""
    from mae_st_jax import distributed
    from mae_st_jax.train import loop

    tiny_config.total_steps = 2
    pretrain.train(tiny_config, str(tmp_path))  # checkpoint 2
    real = distributed.gather
    monkeypatch.setattr(distributed, "gather", lambda name, value, *a: (
        [value, ""] if name == "checkpoint steps" else real(name, value, *a)))
    with pytest.raises(loop.WorkdirError, match=r"different checkpoints in .* \(steps process 0: 2; process 1: "
                                                r"none\): every process needs the same workdir"):
        pretrain.run(tiny_config, str(tmp_path))
    with pytest.raises(checkpoint.StepsDifferError):  # init_from reads another workdir through the same check
        mgr = checkpoint.manager(str(tmp_path), async_save=False)
        try:
            checkpoint.newest_readable(mgr, lambda m, s: s)
        finally:
            mgr.close()
