"""sdbatch-tiny: the project's own small Stable Diffusion, trained offline on procedural scenes.

`model_path()` is the shipped diffusers folder (what a job that names no model renders with);
`scenes` makes the training data; `classifier` scores generated images; `train` and
`evaluate` rebuild and re-measure the model. Importing this package imports no torch.
"""

from __future__ import annotations

from pathlib import Path

MODEL_NAME = "sdbatch-tiny"


def model_path() -> Path:
    """Folder of the shipped sdbatch-tiny model (StableDiffusionPipeline.from_pretrained layout)."""
    return Path(__file__).resolve().with_name("model")


__all__ = ["MODEL_NAME", "model_path"]
