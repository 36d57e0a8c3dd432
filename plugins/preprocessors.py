"""Preprocessors that turn an image into a ControlNet conditioning map: canny, depth, pose.

Pure functions, no hooks: the conditioner plugins call them. Each map follows the
convention the public ControlNets were trained on (lllyasviel's annotators, as
controlnet_aux ships them), so a map made here can drive any SD 1.x ControlNet:

- canny: white edges on black, RGB.
- depth: MiDaS relative inverse depth, near = bright, min-max normalised, RGB grey.
- pose: the OpenPose BODY_18 skeleton in OpenPose's colours on black.

Models load from a hub id, a folder or a single ``.safetensors`` file, never from a
pickle unless asked. torch, transformers and OpenCV are imported where they are used,
so importing this module costs nothing.

    >>> estimator = load_depth_estimator("Intel/dpt-hybrid-midas")   # doctest: +SKIP
    >>> depth_map(estimator, image).save("depth.png")                # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sdbatch.pose import BODY_18, POSE_COLOURS, POSE_LIMBS, draw_pose  # noqa: F401  (the pose convention, re-exported)

from .models import HUB_ID, PICKLE_SUFFIXES  # one definition for every loader

if TYPE_CHECKING:
    import PIL.Image

# COCO-17 index of each BODY_18 keypoint (ViTPose predicts COCO); the neck (None) is derived.
_COCO_FOR_BODY_18 = (0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
_COCO_17 = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
    "right_knee", "left_ankle", "right_ankle",
)
class NoPersonFound(ValueError):
    """No keypoint of any person reached the score threshold."""


@dataclass
class Estimator:
    """A loaded model with its image processor, the device it runs on and where it came from."""

    model: Any
    processor: Any
    device: str
    source: str


# ---------------------------------------------------------------- canny


def canny_map(image: PIL.Image.Image, low: int = 100, high: int = 200) -> PIL.Image.Image:
    """White edges on black, RGB, same size (what canny ControlNets expect).

    OpenCV's cv2.Canny on the RGB image, as lllyasviel's annotator does (100/200 are its
    defaults): on colour input OpenCV takes the strongest channel's gradient, so two colours
    of equal brightness (green on red) still give an edge, which grey would lose.
    """
    import cv2
    from PIL import Image

    if not 0 <= low <= high:
        raise ValueError(f"canny thresholds must satisfy 0 <= low <= high, got low={low}, high={high}")
    rgb = np.ascontiguousarray(np.asarray(_as_pil(image).convert("RGB")))
    return Image.fromarray(cv2.Canny(rgb, low, high)).convert("RGB")


# ---------------------------------------------------------------- depth


def load_depth_estimator(ref: str, device: str = "cpu", allow_pickle: bool = False) -> Estimator:
    """A MiDaS/DPT depth model through transformers, from a hub id, a folder or a single file.

    ``ref`` is a hub id (e.g. ``Intel/dpt-hybrid-midas``; only from the local HF cache when
    ``HF_HUB_OFFLINE`` is set), a local folder (config.json + model.safetensors
    [+ preprocessor_config.json]), or one ``.safetensors`` file with its config beside it
    (same stem + ``.json``, or ``config.json`` in the same folder). ``.bin``/``.pt``/``.ckpt``
    pickles are refused unless ``allow_pickle``. Returns an :class:`Estimator` whose
    ``.model`` is a ``DPTForDepthEstimation`` in eval mode on ``device`` and whose
    ``.processor`` is the folder's ``DPTImageProcessor`` or, without one, MiDaS's
    normalisation at the model's square input size. Raises
    ValueError or FileNotFoundError saying what was tried and what to do.
    """
    from transformers import DPTConfig, DPTForDepthEstimation

    return _load_estimator(ref, device, allow_pickle, DPTConfig, DPTForDepthEstimation, "dpt",
                           _dpt_processor_class(), _default_dpt_processor, what="depth")


def depth_map(estimator: Estimator, image) -> PIL.Image.Image:
    """Relative inverse depth as ControlNet depth models expect: RGB grey, near = bright.

    MiDaS/DPT already predict inverse depth (large = near); the prediction is resized
    back to the input size (bicubic) and min-max normalised to 0..255. Deterministic on CPU.
    """
    import torch
    from PIL import Image

    image = _as_pil(image).convert("RGB")
    inputs = estimator.processor(images=image, return_tensors="pt")
    pixels = inputs["pixel_values"].to(estimator.device, dtype=estimator.model.dtype)
    with torch.inference_mode():
        predicted = estimator.model(pixel_values=pixels).predicted_depth
    width, height = image.size
    depth = torch.nn.functional.interpolate(
        predicted[:, None].float(), size=(height, width), mode="bicubic", align_corners=False
    )[0, 0].cpu().numpy()
    # Normalise after resizing: bicubic overshoots, and the map must still span 0..255.
    low, high = float(depth.min()), float(depth.max())
    scaled = (depth - low) / (high - low) if high > low else np.zeros_like(depth)
    grey = np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


# ---------------------------------------------------------------- pose


def load_pose_estimator(ref: str, device: str = "cpu", allow_pickle: bool = False) -> Estimator:
    """ViTPose (``VitPoseForPoseEstimation`` + ``VitPoseImageProcessor``, COCO 17 keypoints).

    ``ref`` takes the same forms as :func:`load_depth_estimator` (hub id such as
    ``usyd-community/vitpose-base-simple``, folder, single ``.safetensors`` with its
    config beside it). ViTPose is a top-down model: it needs person boxes. By default
    :func:`pose_keypoints` uses the whole image as one box, so no person detector (and
    no extra model download) is needed; crop to the person, or pass ``boxes``, for
    small or several people.
    """
    from transformers import VitPoseConfig, VitPoseForPoseEstimation

    return _load_estimator(ref, device, allow_pickle, VitPoseConfig, VitPoseForPoseEstimation, "vitpose",
                           _vitpose_processor_class(), _default_vitpose_processor, what="pose")


def pose_keypoints(
    estimator: Estimator,
    image,
    threshold: float = 0.3,
    boxes: list[tuple[float, float, float, float]] | None = None,
) -> list[np.ndarray]:
    """One (18, 3) float array per person: OpenPose BODY_18 keypoints as x, y, score.

    Order: nose, neck, r-shoulder, r-elbow, r-wrist, l-shoulder, l-elbow, l-wrist, r-hip,
    r-knee, r-ankle, l-hip, l-knee, l-ankle, r-eye, l-eye, r-ear, l-ear; x and y in pixels
    of ``image``. The neck is the midpoint of the shoulders, scored the lower of the two.
    ``boxes`` are person boxes in COCO form (x, y, width, height); by default the whole
    image is one person. Keypoints under ``threshold`` keep their score (``draw_pose``
    skips them); a person with no keypoint at or over it is dropped. Raises
    :class:`NoPersonFound` when nobody is left.
    """
    import torch

    image = _as_pil(image).convert("RGB")
    width, height = image.size
    boxes = [(0.0, 0.0, float(width), float(height))] if boxes is None else [_check_box(b) for b in boxes]
    if not boxes:
        raise ValueError("boxes is empty: pass at least one person box (x, y, width, height), or None")
    inputs = estimator.processor(images=image, boxes=[boxes], return_tensors="pt")
    pixels = inputs["pixel_values"].to(estimator.device, dtype=estimator.model.dtype)
    kwargs = {}
    if getattr(estimator.model.config.backbone_config, "num_experts", 1) > 1:
        # ViTPose+ has one expert head per training set; index 0 is COCO's 17 keypoints.
        kwargs["dataset_index"] = torch.zeros(len(boxes), dtype=torch.long, device=estimator.device)
    with torch.inference_mode():
        outputs = estimator.model(pixel_values=pixels, **kwargs)
    outputs.heatmaps = outputs.heatmaps.float()
    results = estimator.processor.post_process_pose_estimation(outputs, boxes=[boxes])[0]

    people, best = [], -math.inf
    for result in results:
        coco = np.concatenate([result["keypoints"].numpy().reshape(-1, 2),
                               result["scores"].numpy().reshape(-1, 1)], axis=1).astype(np.float32)
        if coco.shape[0] != len(_COCO_17):
            raise ValueError(f"{estimator.source} predicts {coco.shape[0]} keypoints; COCO's 17 are needed "
                             "for OpenPose's skeleton (use a COCO ViTPose such as usyd-community/vitpose-base-simple)")
        person = coco_to_body18(coco)
        best = max(best, float(person[:, 2].max()))
        if person[:, 2].max() >= threshold:
            people.append(person)
    if not people:
        raise NoPersonFound(f"no person found: the best keypoint score is {best:.3f}, under the threshold "
                            f"{threshold}; lower the threshold, or crop the image (or pass boxes) to the person")
    return people


def coco_to_body18(coco: np.ndarray) -> np.ndarray:
    """COCO-17 keypoints (17, 3: x, y, score) in OpenPose BODY_18 order, the neck added between the shoulders."""
    coco = np.asarray(coco, dtype=np.float32)
    body = np.zeros((len(BODY_18), 3), np.float32)
    for i, j in enumerate(_COCO_FOR_BODY_18):
        if j is not None:
            body[i] = coco[j]
    shoulders = coco[[5, 6]]
    body[1, :2] = shoulders[:, :2].mean(axis=0)
    body[1, 2] = shoulders[:, 2].min()
    return body


# ---------------------------------------------------------------- tiny models


def make_tiny_dpt(folder, seed: int = 0) -> Path:
    """A random-initialised tiny DPTForDepthEstimation (64x64 input) saved as a normal folder.

    config.json + model.safetensors + preprocessor_config.json, as save_pretrained writes
    them, so tests exercise the real loading code offline. About 120 kB.
    """
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation

    _quiet_transformers()
    folder = Path(folder)
    config = DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        image_size=64, patch_size=8, is_hybrid=False, backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[16, 16, 32, 32], fusion_hidden_size=16, use_auxiliary_head=False,
    )
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
        torch.manual_seed(seed)
        model = DPTForDepthEstimation(config).eval()
        _spread_init(model)
    model.save_pretrained(folder)
    _default_dpt_processor(config).save_pretrained(folder)
    return folder


def _spread_init(model) -> None:
    """Re-draw weights at unit gain (std 1/sqrt(fan-in)), biases small but non-zero.

    transformers' init (std 0.02, zero biases) is meant for training; through DPT's
    ReLU chain it leaves a random model's depth flat (every pixel equal), which would
    test nothing. At unit gain a random map varies over the image.
    """
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim > 1:
                fan_in = param[0].numel()
                param.normal_(0.0, fan_in**-0.5)
            elif "layernorm" not in name:
                param.normal_(0.0, 0.1)
        model.head.head[-2].bias.fill_(0.5)  # the last ReLU: start on its open side


def make_tiny_vitpose(folder, seed: int = 0) -> Path:
    """A random-initialised tiny VitPoseForPoseEstimation (64x48 input, COCO 17) saved as a normal folder."""
    import torch
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation

    _quiet_transformers()
    folder = Path(folder)
    backbone = VitPoseBackboneConfig(
        image_size=[64, 48], patch_size=[8, 8], hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, mlp_ratio=2, out_indices=[2],
    )
    config = VitPoseConfig(
        backbone_config=backbone, scale_factor=4, use_simple_decoder=True,
        id2label=dict(enumerate(_COCO_17)), label2id={n: i for i, n in enumerate(_COCO_17)},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VitPoseForPoseEstimation(config).eval()
    model.save_pretrained(folder)
    _vitpose_processor_class()(size={"height": 64, "width": 48}).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- loading


def _load_estimator(ref, device, allow_pickle, config_class, model_class, model_type, processor_class,
                    default_processor, what: str) -> Estimator:
    """Resolve ``ref`` (hub id, folder, single file), load model and processor, check the weights fit."""
    _quiet_transformers()
    path = Path(ref).expanduser()
    if path.is_dir():
        kwargs = _folder_kwargs(path, allow_pickle, what)
        config = _read_config(path / "config.json", config_class, model_type, what)
        model, info = model_class.from_pretrained(path, config=config, output_loading_info=True, **kwargs)
        processor = (processor_class.from_pretrained(path, local_files_only=True)
                     if (path / "preprocessor_config.json").is_file() else default_processor(config))
        source = str(path)
    elif path.suffix.lower() in (".safetensors",) + PICKLE_SUFFIXES:
        config_path = _single_file_config(path, allow_pickle, what)
        config = _read_config(config_path, config_class, model_type, what)
        state = _read_weights(path)
        model, info = model_class.from_pretrained(None, config=config, state_dict=state, output_loading_info=True)
        beside = path.parent / "preprocessor_config.json"
        processor = (processor_class.from_pretrained(path.parent, local_files_only=True)
                     if beside.is_file() else default_processor(config))
        source = str(path)
    elif HUB_ID.fullmatch(ref):
        model, info, processor = _load_hub(ref, allow_pickle, model_class, model_type, processor_class,
                                           default_processor, what)
        source = ref
    else:
        raise FileNotFoundError(f"{what} model not found: {ref!r} is not a folder, a .safetensors file "
                                "or a hub id (org/name); check the path")
    missing = list(info.get("missing_keys", ())) + [str(m) for m in info.get("mismatched_keys", ())]
    if missing:
        # A checkpoint for another architecture would otherwise run with random weights, silently.
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise ValueError(f"{source} does not fit its config: {len(missing)} weights are missing or have "
                         f"the wrong shape ({shown}); is the config the one the weights were saved with?")
    model = model.to(device).eval().requires_grad_(False)
    return Estimator(model=model, processor=processor, device=str(device), source=source)


def _folder_kwargs(path: Path, allow_pickle: bool, what: str) -> dict:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: a {what} model folder needs config.json and "
                                "model.safetensors (as save_pretrained writes them)")
    if any(path.glob("*.safetensors")):
        return {"use_safetensors": True, "local_files_only": True}
    if any(path.glob(f"*{suffix}") for suffix in PICKLE_SUFFIXES):
        if not allow_pickle:
            raise ValueError(f"{path} holds only pickle weights (.bin/.pt), which can run arbitrary code when "
                             "loaded; re-save them as safetensors, or pass allow_pickle=True if you trust them")
        return {"use_safetensors": False, "local_files_only": True}
    raise FileNotFoundError(f"{path} has no model weights: expected model.safetensors beside config.json")


def _single_file_config(path: Path, allow_pickle: bool, what: str) -> Path:
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise ValueError(f"{path.name} is a pickle file, which can run arbitrary code when loaded; "
                         "convert it to .safetensors, or pass allow_pickle=True if you trust it")
    if not path.is_file():
        raise FileNotFoundError(f"{what} model file not found: {path}")
    tried = [path.with_suffix(".json"), path.parent / "config.json"]
    for candidate in tried:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{path.name} needs its config.json beside it; looked for "
                            f"{' and '.join(str(t) for t in tried)}. Copy the model's config.json there")


def _read_config(path: Path, config_class, model_type: str, what: str):
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read the model config {path}: {err}") from err
    found = data.get("model_type")
    if found != model_type:
        raise ValueError(f"{path} describes a {found!r} model; the {what} preprocessor needs a "
                         f"{model_type!r} one (config.json with \"model_type\": \"{model_type}\")")
    return config_class.from_json_file(str(path))


def _read_weights(path: Path) -> dict:
    """A state dict from safetensors, or from a pickle (only reached with allow_pickle) tensors-only."""
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    state = torch.load(str(path), map_location="cpu", weights_only=True)
    # Lightning-style checkpoints nest the weights under "state_dict".
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _load_hub(ref, allow_pickle, model_class, model_type, processor_class, default_processor, what):
    offline = bool(os.environ.get("HF_HUB_OFFLINE"))
    try:
        model, info = model_class.from_pretrained(
            ref, local_files_only=offline, use_safetensors=None if allow_pickle else True,
            output_loading_info=True,
        )
    except OSError as err:
        hint = ("it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; download it once "
                "online, or pass a local folder" if offline else
                "check the id, your network, or whether it ships only pickle weights (allow_pickle=True)")
        raise ValueError(f"cannot load {what} model {ref!r} from the hub: {hint} ({err})") from err
    if model.config.model_type != model_type:
        raise ValueError(f"{ref} is a {model.config.model_type!r} model, not {model_type!r}")
    try:
        processor = processor_class.from_pretrained(ref, local_files_only=offline)
    except OSError:
        processor = default_processor(model.config)  # repos without preprocessor_config.json
    return model, info, processor


def _dpt_processor_class():
    """DPTImageProcessor; without torchvision, transformers 5 needs its PIL variant asked for by name."""
    import transformers

    return _processor_class(transformers, "DPTImageProcessor")


def _vitpose_processor_class():
    """VitPoseImageProcessor, or its PIL variant when torchvision is absent (see _dpt_processor_class)."""
    import transformers

    return _processor_class(transformers, "VitPoseImageProcessor")


def _processor_class(transformers, name: str):
    import importlib.util

    pil = getattr(transformers, name + "Pil", None)
    # transformers 4.x has only the numpy/PIL class, under the plain name.
    if pil is not None and importlib.util.find_spec("torchvision") is None:
        return pil
    return getattr(transformers, name)


def _default_dpt_processor(config):
    """MiDaS's normalisation (mean/std 0.5), bicubic resize to the model's square input size.

    Square, not MiDaS's aspect-kept multiple of 32: transformers' DPT neck rebuilds the
    token grid as a square for plain-ViT and hybrid models alike, so other shapes fail.
    """
    side = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    return _dpt_processor_class()(
        size={"height": side, "width": side}, keep_aspect_ratio=False, resample=3,
        do_normalize=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )


def _default_vitpose_processor(config):
    """ViTPose's preprocessing at the backbone's input size (ImageNet mean/std, box-centred warp)."""
    height, width = config.backbone_config.image_size
    return _vitpose_processor_class()(size={"height": height, "width": width})


def _quiet_transformers() -> None:
    """Keep load chatter (progress bars, torchvision fallback notes) out of sdbatch's output."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# ---------------------------------------------------------------- helpers


def _as_pil(image) -> PIL.Image.Image:
    """A PIL image from a PIL image or a uint8 array (H, W[, 3])."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"expected a PIL image or a uint8 array (H, W[, 3]); got {array.dtype} {array.shape}")
    return Image.fromarray(array)


def _check_box(box) -> tuple[float, float, float, float]:
    values = tuple(float(v) for v in box)
    if len(values) != 4 or values[2] <= 0 or values[3] <= 0:
        raise ValueError(f"a person box is (x, y, width, height) with positive size; got {box!r}")
    return values
