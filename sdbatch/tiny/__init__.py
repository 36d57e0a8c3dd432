"""sdbatch-tiny: the project's own small Stable Diffusion, trained offline on procedural scenes.

`model_path()` is the shipped diffusers folder (what a job that names no model renders with);
`controlnet_path(kind)` its canny, depth and pose ControlNets, `depth_estimator_path()` a small
DPT for the depth conditioner, `pose_estimator_path()` a small ViTPose for the pose conditioner.
`scenes` makes the training data; `classifier` scores generated images; `train`,
`train_controlnet`, `train_depth`, `train_pose`, `evaluate`, `evaluate_control` and
`seed_variety` rebuild and re-measure them. Importing this package imports no torch.
"""

from __future__ import annotations

from pathlib import Path

MODEL_NAME = "sdbatch-tiny"


def model_path() -> Path:
    """Folder of the shipped sdbatch-tiny model (StableDiffusionPipeline.from_pretrained layout)."""
    return Path(__file__).resolve().with_name("model")


def controlnet_path(kind: str) -> Path:
    """Folder of a shipped sdbatch-tiny ControlNet (``canny``, ``depth``, ``pose``), named sdbatch-tiny-<kind>."""
    return Path(__file__).resolve().parent / "controlnet" / kind


def depth_estimator_path() -> Path:
    """Folder of the shipped tiny DPT depth estimator (transformers layout), named sdbatch-tiny-depth."""
    return Path(__file__).resolve().parent / "depth-estimator"


def pose_estimator_path() -> Path:
    """Folder of the shipped tiny ViTPose keypoint estimator (transformers layout), named sdbatch-tiny-pose."""
    return Path(__file__).resolve().parent / "pose-estimator"


def lora_path() -> Path:
    """The shipped example LoRA for sdbatch-tiny (diffusers format): a green tint (``train_lora`` makes it)."""
    return Path(__file__).resolve().parent / "lora" / "tint.safetensors"


def embeddings_path() -> Path:
    """The shipped embeddings folder for sdbatch-tiny: ``tinysun`` (``train_embedding`` makes it)."""
    return Path(__file__).resolve().parent / "embeddings"


__all__ = ["MODEL_NAME", "model_path", "controlnet_path", "depth_estimator_path", "pose_estimator_path", "lora_path",
           "embeddings_path"]
