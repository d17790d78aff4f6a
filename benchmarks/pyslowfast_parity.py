"""Our import of PySlowFast checkpoints against the real models: reads the case files that
benchmarks/pyslowfast_case.py wrote (SlowFast run outside this repository, float64), imports each one's
weights with the settings its `cfg` records (no flags), runs our fp32 forward on its video (and noise), and
prints one JSON line per case: for MaskMViT the mask agreement, the prediction error on the masked tokens
and the loss error; for the fine-tuned ViT the logits' error.

python benchmarks/pyslowfast_parity.py /tmp/sf/case_64.pt /tmp/sf/case_128.pt /tmp/sf/classifier_case.pt
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root


def compare(path: str) -> dict:
    import jax.numpy as jnp
    import torch

    from mae_st_jax.convert import from_torch as conv

    case = torch.load(path, weights_only=True)
    state_dict, hints = conv.load_torch_file(path)  # model_state, and the settings its cfg records
    config = conv.infer_model_config(state_dict, hints)
    model = conv.model_from_params(conv.torch_to_params(state_dict, config), config)
    video = case["video"].numpy().transpose(0, 2, 3, 4, 1).astype(np.float32)  # [B, C, T, H, W] -> channels last
    if config["kind"] == "classifier":  # the fine-tuned ViT: logits before PySlowFast's eval-mode softmax
        theirs = case["logits"].numpy()
        err = np.asarray(model(jnp.asarray(video)), np.float64) - theirs
        return {"case": os.path.basename(path), "kind": "classifier", "settings_from_cfg": hints,
                "logits_max_abs_err": float(np.abs(err).max()), "logits_max_abs": float(np.abs(theirs).max()),
                "logits_rms_rel_err": float(np.sqrt(np.mean(err ** 2) / np.mean(theirs ** 2)))}
    loss, pred, mask = model(jnp.asarray(video), jnp.asarray(case["noise"].numpy()))
    mask = np.asarray(mask)
    ours = np.asarray(pred, np.float64)[mask.astype(bool)]  # theirs: the masked tokens only, batch-major
    theirs = case["pred"][0].numpy()
    err = ours - theirs
    return {"case": os.path.basename(path), "kind": "pretrain", "settings_from_cfg": hints,
            "decoder": {k: config[k] for k in ("decoder_cls", "decoder_pos_table", "decoder_num_heads",
                                               "target_frames")},
            "mask_equal": bool(np.array_equal(mask, case["mask"].numpy())),
            "pred_max_abs_err": float(np.abs(err).max()), "pred_max_abs": float(np.abs(theirs).max()),
            "pred_rms_rel_err": float(np.sqrt(np.mean(err ** 2) / np.mean(theirs ** 2))),
            "loss": float(loss), "loss_reference": float(case["loss"]),
            "loss_rel_err": abs(float(loss) / float(case["loss"]) - 1.0)}


def main(paths):
    if not paths:
        raise SystemExit(__doc__)
    for path in paths:
        print(json.dumps(compare(path)))


if __name__ == "__main__":
    main(sys.argv[1:])
