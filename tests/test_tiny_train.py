"""The sdbatch-tiny training script at toy size: every stage runs, exports, and resumes exactly."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# Every stage, a few steps each, on 48 scenes: the whole pipeline in seconds.
TOY = [
    "--n-scenes", "48", "--vae-steps", "3", "--vae-batch", "4", "--unet-steps", "3", "--unet-schedule-steps", "3",
    "--vpred-steps", "2", "--tune-steps", "3", "--refine-steps", "2", "--decoder-steps", "2", "--decoder-batch", "4",
    "--unet-batch", "4", "--checkpoint-every", "1", "--preview-every", "1000",
]  # fmt: skip


def _train(tmp_path: Path, name: str, extra: list[str] = ()) -> Path:
    from sdbatch.tiny import train

    out = tmp_path / name / "model"
    train.main([*TOY, "--ckpt", str(tmp_path / name / "ckpt"), "--out", str(out), "--fp32", *extra])
    return out


def _weights(model: Path) -> dict:
    from safetensors.torch import load_file

    return {str(p.relative_to(model)): load_file(str(p)) for p in sorted(model.rglob("*.safetensors"))}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x) for x, y in zip(a.values(), b.values())
    )


def test_every_stage_runs_and_exports_a_plain_diffusers_pipeline(tmp_path):
    import json

    import torch
    from diffusers import StableDiffusionPipeline

    model = _train(tmp_path, "run")
    record = json.loads((model / "training.json").read_text())
    assert set(record["seconds"]) == {"vae", "unet", "unet_v", "unet_tune", "unet_refine", "decoder"}
    assert "cores" in record["machine"]
    assert record["tune_steps_done"] == 3 and record["refine_steps_done"] == 2 and record["decoder_steps_done"] == 2
    log = (model / "loss_log.csv").read_text().splitlines()
    assert log[0] == "stage,step,loss,lr,seconds" and {row.split(",")[0] for row in log[1:]} >= {"vae", "unet_tune"}
    pipe = StableDiffusionPipeline.from_pretrained(str(model))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    image = pipe("a large red circle on the left, on a white background", num_inference_steps=2, height=64,
                 width=64, generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3)


def test_a_run_killed_mid_stage_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from sdbatch.tiny import train

    unbroken = _weights(_train(tmp_path, "unbroken"))

    class Killed(Exception):
        pass

    real_save = train._save_ckpt

    def save_then_die(folder, step, modules, optimizer):
        real_save(folder, step, modules, optimizer)
        if folder.name == "unet_tune_ckpt" and step == 1:  # mid-way through a stage with the token loss
            raise Killed

    monkeypatch.setattr(train, "_save_ckpt", save_then_die)
    with pytest.raises(Killed):
        _train(tmp_path, "resumed")
    monkeypatch.setattr(train, "_save_ckpt", real_save)
    assert _same(_weights(_train(tmp_path, "resumed")), unbroken)


def test_token_identity_loss_reads_back_words_and_ignores_padding():
    import torch

    from sdbatch.tiny.train import token_identity_loss

    pad = 9
    ids = torch.tensor([[1, 2, 3, pad, pad], [4, pad, pad, pad, pad]])
    head = torch.nn.Identity()  # hidden states that are exactly one-hot logits of their ids
    hidden = torch.nn.functional.one_hot(ids, 10).float() * 50
    assert token_identity_loss(head, hidden, ids, pad) < 1e-6
    hidden[0, 3] = 0.0  # padding positions do not count
    assert token_identity_loss(head, hidden, ids, pad) < 1e-6
    hidden[0, 1] = torch.nn.functional.one_hot(torch.tensor(7), 10).float() * 50  # a word read back wrong
    assert token_identity_loss(head, hidden, ids, pad) > 1.0


def test_controlnet_training_refuses_a_checkpoint_of_another_base_model(tmp_path):
    import json

    from sdbatch.tiny.train_controlnet import _check_resumable

    ckpt = tmp_path / "canny"
    settings = {"steps": 1000, "cfg_dropout": 0.5}
    _check_resumable(ckpt, "new", settings)  # nothing there yet: train afresh
    (ckpt / "ckpt").mkdir(parents=True)
    (ckpt / "ckpt" / "step.json").write_text('{"step": 1000}')
    (ckpt / "config.json").write_text(json.dumps({"kind": "canny", "base": "old", **settings}))
    _check_resumable(ckpt, "old", settings)  # same base and settings: resume
    with pytest.raises(SystemExit, match="another base model"):
        _check_resumable(ckpt, "new", settings)
    with pytest.raises(SystemExit, match=r"other settings \(cfg_dropout\)"):
        _check_resumable(ckpt, "old", {**settings, "cfg_dropout": 0.1})
