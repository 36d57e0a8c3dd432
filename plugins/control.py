"""ControlNet conditioners: canny edges, MiDaS/DPT depth, OpenPose-style pose, or a map as given.

Each conditioner reads its input image (a file, one per item from a folder, or one per
frame in an animation), turns it into a control map with its preprocessor, and adds a
ControlNet to the batch with the item's scale and guidance start/end. Several control
conditioners in one job are several ControlNets whose residuals add up (multi-ControlNet).

Resize policy (``resize``): the input is brought to the item's size before preprocessing:
``crop`` scales it to cover the item and centre-crops (A1111's "Crop and Resize", the
default), ``fit`` scales it to fit inside and pads with black, ``stretch`` ignores the
aspect ratio, ``none`` requires the exact size and fails the item otherwise.

Preprocessed maps are cached per worker by the input's sha256, the preprocessor options
and the size, so one depth map serves every item that shares the input.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sdbatch import hookimpl
from sdbatch.api import Conditioner, Extension, Writer

IMAGE_HELP = "an image file, a folder (one item per image) or, in an animation, a folder with one image per frame"
RESIZE_MODES = ("crop", "fit", "stretch", "none")
# Maps kept per worker: a few hundred 512x512 RGB maps are well under a gigabyte.
MAP_CACHE_SIZE = 256


def field_meta(**meta) -> dict:
    """Option metadata (help, ranges, image=True ...) as the job schema reads it."""
    return meta


_m = field_meta


@dataclass
class ControlOptions:
    """What every ControlNet conditioner takes; each kind adds its preprocessor's options."""

    image: str = field(metadata=_m(image=True, help=IMAGE_HELP))
    controlnet: str = field(metadata=_m(model_ref=True, help="a ControlNet: sdbatch-tiny-canny, a folder, "
                                                            "a .safetensors file or a hub id"))
    scale: float = field(default=1.0, metadata=_m(min=0.0, max=5.0))
    start: float = field(default=0.0, metadata=_m(min=0.0, max=1.0, help="fraction of the steps"))
    end: float = field(default=1.0, metadata=_m(min=0.0, max=1.0, help="fraction of the steps"))
    resize: Literal["crop", "fit", "stretch", "none"] = "crop"
    allow_pickle: bool = False


#: The ControlNet extension's names for the resize options (A1111 has no "none": the input's own size).
A1111_RESIZE_MODES = {"crop": "Crop and Resize", "fit": "Resize and Fill", "stretch": "Just Resize", "none": "None"}


class ControlConditioner(Conditioner):
    """Base of the ControlNet conditioners: input -> cached control map -> ControlNet residuals."""

    Options = ControlOptions
    # One net per conditioner and batch: items that sweep the ControlNet never share a batch.
    batch_options = ("controlnet", "allow_pickle")
    requires = ("controlnet",)

    def preprocess(self, image, options, device: str):
        """The control map (RGB PIL image, same size) for an input already at the item's size."""
        raise NotImplementedError

    def a1111_fields(self, item, options) -> list:
        """The ControlNet extension's unit text: ``ControlNet 0: "Module: canny, Model: ..., ..."``."""
        from pathlib import Path

        unit = {"Module": "none" if self.name == "image" else self.name,
                "Model": Path(options.controlnet).stem or options.controlnet, "Weight": f"{options.scale:g}",
                "Resize Mode": A1111_RESIZE_MODES[options.resize], **self.thresholds(options),
                "Guidance Start": f"{options.start:g}", "Guidance End": f"{options.end:g}"}
        return [("ControlNet {n}", ", ".join(f"{key}: {value}" for key, value in unit.items()))]

    def thresholds(self, options) -> dict:
        """The extension's ``Threshold A``/``Threshold B`` for a preprocessor that has them."""
        return {}

    def preprocessor_key(self, options) -> dict:
        """The options that change the map (part of the cache key): those a kind adds."""
        import dataclasses

        shared = {f.name for f in dataclasses.fields(ControlOptions)}
        return {f.name: getattr(options, f.name) for f in dataclasses.fields(options) if f.name not in shared}

    def condition(self, items, options, model, state):
        import numpy as np
        import torch

        maps = []
        for row, (item, opts) in enumerate(zip(items, options)):
            control_map, key = self.control_map(item, opts, str(model.device))
            state.outputs[row].setdefault("control_maps", {})[self.name] = (control_map, key)
            maps.append(torch.from_numpy(np.asarray(control_map, dtype=np.float32) / 255.0).permute(2, 0, 1))
        net = load_controlnet(options[0].controlnet, model, options[0].allow_pickle)
        maps = torch.stack(maps).to(model.device, model.dtype)
        control = model.family.control_input(model, net, maps, state.generators)
        return ControlExtension(state, net, control, [o.scale for o in options],
                                [o.start for o in options], [o.end for o in options])

    def control_map(self, item, options, device: str):
        """The item's control map and its cache key (a hash), from the per-worker cache when possible."""
        import hashlib

        path = input_file(item, options.image)
        key = json.dumps([self.name, item.extra.get("inputs", {}).get(path, path), self.preprocessor_key(options),
                          item.width, item.height, options.resize])
        key = hashlib.sha256(key.encode()).hexdigest()[:12]
        cached = _MAPS.get(key)
        if cached is None:
            image = load_image(path, item.width, item.height, options.resize)
            cached = self.preprocess(image, options, device).convert("RGB")
            _MAPS[key] = cached
            while len(_MAPS) > MAP_CACHE_SIZE:
                _MAPS.popitem(last=False)
        else:
            _MAPS.move_to_end(key)
        return cached, key

    def check(self, options, job) -> list[str]:
        """A ControlNet whose config does not fit the job's model(s), found from config files alone."""
        problems = []
        config = controlnet_config(options.controlnet)
        location = resolve_controlnet(options.controlnet)
        if config is None and _looks_local(location):
            problems.append(f"ControlNet not found: {options.controlnet} (looked for {location}; a folder with "
                            f"config.json, a .safetensors file, or a hub id such as lllyasviel/sd-controlnet-canny)")
        families = job.plugins.get("family", {})
        for ref, info in job.plan.models.items() if config is not None else ():  # a hub id is checked as it loads
            family = families.get(ref)
            denoiser = _denoiser_config(info.location)
            if family is not None and denoiser is not None:
                problems += compatibility_problems(config, denoiser, options.controlnet, info.ref, family)
        estimator = getattr(options, "estimator", None)
        if estimator:
            location = _estimator_location(estimator)
            if _looks_local(location) and not Path(location).exists():
                problems.append(f"{self.name} estimator not found: {estimator} (looked for {location})")
        if options.end <= options.start:
            problems.append(f"end ({options.end}) must be after start ({options.start})")
        return problems


class ControlExtension(Extension):
    """One ControlNet in the loop: its residuals, scaled per row, added to the denoiser's.

    ``control`` is what the net takes, one row per item (the map, or its latents on
    transformer families: ``Family.control_input``); the family runs the net
    (``Family.control``). A net is on for a row while ``start <= step/steps`` and
    ``(step+1)/steps <= end`` (the A1111 extension's guidance start/end), so one batch can
    sweep the control scale and its window.
    """

    def __init__(self, state, net, control, scales: list, starts: list, ends: list):
        self.state, self.net, self.control = state, net, control
        self.scales, self.starts, self.ends = scales, starts, ends

    def denoiser_kwargs(self, step, t, x, cond) -> dict:
        import torch

        state, model = self.state, self.state.model
        total = len(state.timesteps)
        weights = [scale if (step / total >= start and (step + 1) / total <= end) else 0.0
                   for scale, start, end in zip(self.scales, self.starts, self.ends)]
        if not any(weights):
            return {}
        weight = state.for_guidance(torch.tensor(weights, device=x.device, dtype=x.dtype))
        guidance = state.for_guidance(torch.tensor([item.guidance for item in state.items], dtype=torch.float32))
        first = state.items[0]
        kwargs = model.family.control(model, self.net, x, t, cond, guidance, state.for_guidance(self.control),
                                      first.width, first.height)
        return {key: scale_rows(value, weight) for key, value in kwargs.items()}


def scale_rows(value, weight):
    """Every tensor in ``value`` (or in a list of them) times its row's weight; other values as they are."""
    import torch

    if isinstance(value, (list, tuple)):
        return [scale_rows(v, weight) for v in value]
    if isinstance(value, torch.Tensor):
        return value * weight.view(-1, *([1] * (value.dim() - 1)))
    return value


_MAPS: OrderedDict = OrderedDict()


def input_file(item, value: str) -> str:
    """The input file for an item (a per-frame folder gives the frame's image)."""
    from sdbatch.inputs import frame_file

    animation = item.extra.get("animation")
    return frame_file(value, animation["frame"] if animation and "frame" in animation else None)


# ---------------------------------------------------------------- images
def load_image(path: str, width: int, height: int, resize: str = "crop", mode: str = "RGB"):
    """An input image at the item's size under a resize policy; errors name the file."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened).convert(mode)
    except FileNotFoundError:
        raise ValueError(f"input image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from None
    size = (width, height)
    if image.size == size:
        return image
    if resize == "none":
        raise ValueError(f"{path} is {image.width}x{image.height} but the item is {width}x{height}; "
                         f"resize: none needs equal sizes (use crop, fit or stretch)")
    lanczos = Image.Resampling.LANCZOS
    if resize == "stretch":
        return image.resize(size, lanczos)
    if resize == "fit":
        fitted = ImageOps.contain(image, size, lanczos)
        canvas = Image.new(mode, size)
        canvas.paste(fitted, ((width - fitted.width) // 2, (height - fitted.height) // 2))
        return canvas
    return ImageOps.fit(image, size, lanczos)


# ---------------------------------------------------------------- ControlNets
def resolve_controlnet(ref: str) -> str:
    """A built-in name (sdbatch-tiny-canny, sdbatch-tiny-depth) to its folder; anything else as given."""
    from sdbatch.tiny import controlnet_path

    if ref.startswith("sdbatch-tiny-"):
        return str(controlnet_path(ref[len("sdbatch-tiny-"):]))
    return ref


def controlnet_config(ref: str) -> dict | None:
    """The ControlNet's config.json (folder, or beside a single file), or None if not local."""
    path = Path(resolve_controlnet(ref))
    candidates = [path / "config.json"] if path.is_dir() else [path.with_suffix(".json"), path.parent / "config.json"]
    for candidate in candidates:
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return None


def _looks_local(location: str) -> bool:
    """A path rather than a hub id (org/name): absolute, relative with ./, a file suffix, or no slash."""
    from sdbatch_plugins.models import HUB_ID

    path = Path(location)
    return path.is_absolute() or location.startswith(".") or path.suffix != "" or not HUB_ID.fullmatch(location)


def _denoiser_config(location: str) -> dict | None:
    """The U-Net's or transformer's config.json in a diffusers folder."""
    for folder in ("unet", "transformer"):
        path = Path(location) / folder / "config.json"
        if path.is_file():
            return json.loads(path.read_text())
    return None


def compatibility_problems(control: dict, denoiser: dict, control_ref: str, model_ref: str, family) -> list[str]:
    """Why a ControlNet cannot steer a model: its class and residuals must fit the family's denoiser."""
    kind = control.get("_class_name")
    if kind and family.controlnet_class and kind != family.controlnet_class:
        return [f"ControlNet {control_ref} is a {kind}; model {model_ref} ({family.description}) "
                f"takes a {family.controlnet_class}"]
    problems = []
    for key, what in family.controlnet_fit.items():
        if key in control and key in denoiser and control[key] != denoiser[key]:
            hint = " (a ControlNet for another SD version?)" if key == "cross_attention_dim" else ""
            problems.append(f"ControlNet {control_ref} does not fit model {model_ref}: {what} "
                            f"{control[key]} vs {denoiser[key]}{hint}")
    return problems


def load_controlnet(ref: str, model, allow_pickle: bool = False):
    """The family's ControlNet class on the model's device and dtype, loaded once per worker and model."""
    cache = model.extra.setdefault("controlnets", {})
    if ref not in cache:
        net = _load_controlnet(resolve_controlnet(ref), allow_pickle, model)
        problems = compatibility_problems(dict(net.config, _class_name=type(net).__name__),
                                          dict(model.denoiser.config), ref, model.info.ref, model.family)
        if problems:
            raise ValueError("; ".join(problems))
        net = net.to(model.device, model.dtype).eval().requires_grad_(False)
        if model.info.memory.get("channels_last"):  # speed.channels_last, as the U-Net it steers
            import torch

            net.to(memory_format=torch.channels_last)
        if str(model.device) == "cpu":
            from sdbatch.rows import make_rows_independent

            make_rows_independent(net)
        cache[ref] = net
    return cache[ref]


def _load_controlnet(location: str, allow_pickle: bool, model):
    import os

    import diffusers

    from sdbatch_plugins.models import PICKLE_SUFFIXES, quiet_libraries

    quiet_libraries()
    ControlNetModel = getattr(diffusers, model.family.controlnet_class or "ControlNetModel")
    path = Path(location)
    if path.suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise ValueError(f"{location} is a pickle file, which can run code when loaded; "
                         f"convert it to .safetensors or set allow_pickle: true")
    if path.is_dir():
        return ControlNetModel.from_pretrained(str(path), use_safetensors=None if allow_pickle else True)
    if path.is_file():
        config = controlnet_config(location)
        if config is not None:  # a diffusers-format state dict with its config beside it
            from safetensors.torch import load_file

            net = ControlNetModel.from_config(config)
            net.load_state_dict(load_file(str(path)))
            return net
        return ControlNetModel.from_single_file(str(path), local_files_only=True)
    if _looks_local(location):
        raise ValueError(f"ControlNet not found: {location}")
    return ControlNetModel.from_pretrained(location, local_files_only=bool(os.environ.get("HF_HUB_OFFLINE")))


# ---------------------------------------------------------------- the conditioners
@dataclass
class CannyOptions(ControlOptions):
    low: int = field(default=100, metadata=_m(min=0, max=255, help="lower hysteresis threshold"))
    high: int = field(default=200, metadata=_m(min=0, max=255, help="upper hysteresis threshold"))


class CannyConditioner(ControlConditioner):
    """Canny edges (OpenCV) steering a canny ControlNet."""

    name = "canny"
    description = "ControlNet on Canny edges of an input image (OpenCV)"
    Options = CannyOptions

    def preprocess(self, image, options, device: str):
        from .preprocessors import canny_map

        return canny_map(image, options.low, options.high)

    def thresholds(self, options) -> dict:
        return {"Threshold A": options.low, "Threshold B": options.high}


@dataclass
class DepthOptions(ControlOptions):
    estimator: str = field(default="Intel/dpt-hybrid-midas",
                           metadata=_m(model_ref=True, help="a DPT/MiDaS model: hub id, folder or .safetensors"))


class DepthConditioner(ControlConditioner):
    """A MiDaS/DPT depth map (transformers) steering a depth ControlNet."""

    name = "depth"
    description = "ControlNet on a depth map estimated by MiDaS/DPT"
    Options = DepthOptions

    def preprocess(self, image, options, device: str):
        from .preprocessors import depth_map

        return depth_map(_estimator("depth", options.estimator, device, options.allow_pickle), image)


@dataclass
class PoseOptions(ControlOptions):
    estimator: str = field(default="usyd-community/vitpose-base-simple",
                           metadata=_m(model_ref=True, help="a ViTPose model: hub id, folder or .safetensors"))
    threshold: float = field(default=0.3, metadata=_m(min=0.0, max=1.0, help="keypoint confidence to draw"))


class PoseConditioner(ControlConditioner):
    """OpenPose-style body keypoints (ViTPose) drawn as the skeleton a pose ControlNet expects."""

    name = "pose"
    description = "ControlNet on a body pose skeleton estimated by ViTPose"
    Options = PoseOptions

    def preprocess(self, image, options, device: str):
        from .preprocessors import draw_pose, pose_keypoints

        estimator = _estimator("pose", options.estimator, device, options.allow_pickle)
        people = pose_keypoints(estimator, image, options.threshold)
        return draw_pose(people, image.size, options.threshold)


class ImageConditioner(ControlConditioner):
    """A control map given as is (an edge, depth or pose map made elsewhere)."""

    name = "image"
    description = "ControlNet on a control map given as an image"

    def preprocess(self, image, options, device: str):
        return image


_ESTIMATORS: dict = {}


def _estimator_location(ref: str) -> str:
    """The built-in sdbatch-tiny-depth to its folder; anything else as given."""
    from sdbatch.tiny import depth_estimator_path

    return str(depth_estimator_path()) if ref == "sdbatch-tiny-depth" else ref


def _estimator(kind: str, ref: str, device: str, allow_pickle: bool):
    """Depth and pose models, loaded once per worker."""
    from . import preprocessors

    key = (kind, ref, device)
    if key not in _ESTIMATORS:
        location = _estimator_location(ref)
        loader = preprocessors.load_depth_estimator if kind == "depth" else preprocessors.load_pose_estimator
        _ESTIMATORS[key] = loader(location, device=device, allow_pickle=allow_pickle)
    return _ESTIMATORS[key]


@hookimpl(trylast=True)
def register_conditioners(register):
    """ControlNet conditioners: canny, depth, pose and image."""
    for conditioner in (CannyConditioner(), DepthConditioner(), PoseConditioner(), ImageConditioner()):
        register(conditioner)


@dataclass
class ControlMapsOptions:
    path: str = field(default="control/{conditioner}-{input}.png",
                      metadata=_m(help="fields: {conditioner}, {input} (input file stem and a hash of "
                                                "content, options and size)"))


class ControlMapsWriter(Writer):
    """Saves each distinct control map once (what the ControlNet saw), beside the outputs."""

    name = "control_maps"
    description = "the preprocessed control maps (edges, depth, pose), once per input"
    Options = ControlMapsOptions

    def write(self, result) -> list:
        from sdbatch.plan import slug

        for use in result.item.conditioners:
            control_map, key = result.outputs.get("control_maps", {}).get(use.name, (None, None))
            if control_map is None:
                continue
            stem = slug(Path(input_file(result.item, use.options["image"])).stem, 40)
            relpath = self.options.path.format(conditioner=use.name, input=f"{stem}-{key}")
            if relpath not in self.context.out.run_files:
                self.context.out.write_run_file_via(relpath, lambda temp: control_map.save(temp, format="PNG"),
                                                    self.name)
        return []


@hookimpl(trylast=True)
def register_writers(register):
    """The control maps writer."""
    register(ControlMapsWriter)
