"""Convert a diffusers Stable Diffusion 1.x pipeline to the original (LDM/CompVis) key layout.

Single-file checkpoints shared as ``model.safetensors`` (A1111, ComfyUI, Civitai) use the key
names of the original ``ldm`` code base, prefixed per component:

* ``model.diffusion_model.``            the UNet (``input_blocks``/``middle_block``/``output_blocks``)
* ``first_stage_model.``                the VAE (``encoder.down.{i}.block.{j}``, ``mid.attn_1`` ...)
* ``cond_stage_model.transformer.``     the CLIP text encoder (``text_model.*``, same names as transformers)

``StableDiffusionPipeline.from_single_file`` only understands that layout; a file holding
diffusers-layout keys loads without error for some parts and then fails on the text encoder.

The functions here are pure key/shape remapping over ``{name: tensor}`` dicts. They infer the
block structure (layers per block, number of blocks, which up blocks have attention) from the
keys, so they work for the full-size SD 1.x models as well as for tiny test models.
OpenCLIP text encoders (SD 2.x) use a different layout and are not handled.
"""

from __future__ import annotations

import re
from pathlib import Path

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."

# --------------------------------------------------------------------------------------------
# UNet
# --------------------------------------------------------------------------------------------

#: Top-level UNet modules: diffusers name -> LDM name.
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}

#: Modules inside a UNet ResnetBlock2D: diffusers name -> LDM ``ResBlock`` name.
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}

_DOWN = re.compile(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)")
_DOWNSAMPLE = re.compile(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)")
_UP = re.compile(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)")
_UPSAMPLE = re.compile(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")


def _rename_first(rest: str, table: dict[str, str]) -> str:
    """Rename the first dotted component of ``rest`` through ``table`` (unchanged if absent)."""
    head, _, tail = rest.partition(".")
    return f"{table.get(head, head)}.{tail}" if tail else table.get(head, head)


def _unet_layers_per_block(keys) -> int:
    """Resnets per down block, read from the keys (SD 1.x: 2)."""
    found = [int(m.group(3)) for k in keys if (m := _DOWN.match(k)) and m.group(2) == "resnets"]
    if not found:
        raise ValueError("not a diffusers UNet state dict: no down_blocks.*.resnets.* keys")
    return max(found) + 1


def unet_to_ldm(state_dict: dict) -> dict:
    """Rename a diffusers ``UNet2DConditionModel`` state dict to LDM ``UNetModel`` names (no prefix).

    LDM numbers every sub-module of the down path in one ``input_blocks`` list: index 0 is
    ``conv_in``, then each down block contributes ``layers_per_block`` (resnet[, attention])
    entries followed by one downsampler entry. The up path (``output_blocks``) has
    ``layers_per_block + 1`` entries per block, the upsampler riding in the block's last entry
    (position 1 when the block has no attention, else 2). Unknown keys raise ``ValueError``.
    """
    per = _unet_layers_per_block(state_dict) + 1  # LDM slots per block
    up_with_attention = {int(m.group(1)) for k in state_dict if (m := _UP.match(k)) and m.group(2) == "attentions"}
    out = {}
    for key, tensor in state_dict.items():
        module, _, param = key.rpartition(".")
        if module in _UNET_TOP:
            new = f"{_UNET_TOP[module]}.{param}"
        elif m := _DOWN.match(key):
            block, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            if kind == "resnets":
                new = f"input_blocks.{per * block + j + 1}.0.{_rename_first(rest, _UNET_RESNET)}"
            else:
                new = f"input_blocks.{per * block + j + 1}.1.{rest}"
        elif m := _DOWNSAMPLE.match(key):
            new = f"input_blocks.{per * (int(m.group(1)) + 1)}.0.op.{m.group(2)}"
        elif m := _UP.match(key):
            block, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            if kind == "resnets":
                new = f"output_blocks.{per * block + j}.0.{_rename_first(rest, _UNET_RESNET)}"
            else:
                new = f"output_blocks.{per * block + j}.1.{rest}"
        elif m := _UPSAMPLE.match(key):
            block = int(m.group(1))
            slot = 2 if block in up_with_attention else 1
            new = f"output_blocks.{per * block + per - 1}.{slot}.{m.group(2)}"
        elif m := _MID.match(key):
            kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
            # LDM middle_block is [resnet, attention, resnet].
            if kind == "resnets":
                new = f"middle_block.{2 * j}.{_rename_first(rest, _UNET_RESNET)}"
            else:
                new = f"middle_block.1.{rest}"
        else:
            raise ValueError(f"unet_to_ldm: no LDM name for UNet key {key!r} (only SD 1.x-style UNets are supported)")
        out[new] = tensor
    return out


# --------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------

#: Modules inside the VAE mid-block attention: diffusers name -> LDM ``AttnBlock`` name.
#: Both the current (to_q ...) and the pre-0.14 diffusers names (query ...) are accepted.
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}

_VAE_DOWN = re.compile(r"encoder\.down_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0)\.(.+)")
_VAE_UP = re.compile(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.+)")
_VAE_MID = re.compile(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_VAE_SAME = re.compile(r"((encoder|decoder)\.(conv_in|conv_out)|quant_conv|post_quant_conv)\.[^.]+")
_VAE_NORM_OUT = re.compile(r"(encoder|decoder)\.conv_norm_out\.([^.]+)")


def _vae_resnet(rest: str) -> str:
    """LDM name of a parameter inside a VAE ResnetBlock2D (only the shortcut is renamed)."""
    return _rename_first(rest, {"conv_shortcut": "nin_shortcut"})


def _vae_attention(rest: str, tensor):
    """LDM name and shape of a VAE mid-block attention parameter.

    diffusers uses Linear layers (``to_out.0`` for the output projection); LDM uses 1×1 convs,
    so 2-D weights become ``(out, in, 1, 1)``.
    """
    head, _, tail = rest.partition(".")
    if head == "to_out":  # "to_out.0.weight": drop the Sequential index
        tail = tail.partition(".")[2]
    if head not in _VAE_ATTENTION:
        raise ValueError(f"vae_to_ldm: unknown attention parameter {rest!r}")
    if tensor.ndim == 2:
        tensor = tensor.reshape(*tensor.shape, 1, 1)
    return f"{_VAE_ATTENTION[head]}.{tail}", tensor


def vae_to_ldm(state_dict: dict) -> dict:
    """Rename a diffusers ``AutoencoderKL`` state dict to LDM ``AutoencoderKL`` names (no prefix).

    The decoder's up blocks are numbered in reverse in LDM (diffusers ``up_blocks.0`` works at
    the lowest resolution, LDM ``up.0`` at the highest), mid-block resnets are ``block_1``/
    ``block_2`` and the mid attention's linear weights become 1×1 conv weights.
    """
    n_up = 1 + max((int(m.group(1)) for k in state_dict if (m := _VAE_UP.match(k))), default=-1)
    out = {}
    for key, tensor in state_dict.items():
        if _VAE_SAME.fullmatch(key):
            new = key
        elif m := _VAE_NORM_OUT.fullmatch(key):
            new = f"{m.group(1)}.norm_out.{m.group(2)}"
        elif m := _VAE_DOWN.fullmatch(key):
            block, rest = m.group(1), m.group(4)
            if m.group(3) is None:
                new = f"encoder.down.{block}.downsample.{rest}"
            else:
                new = f"encoder.down.{block}.block.{m.group(3)}.{_vae_resnet(rest)}"
        elif m := _VAE_UP.fullmatch(key):
            block, rest = n_up - 1 - int(m.group(1)), m.group(4)
            if m.group(3) is None:
                new = f"decoder.up.{block}.upsample.{rest}"
            else:
                new = f"decoder.up.{block}.block.{m.group(3)}.{_vae_resnet(rest)}"
        elif m := _VAE_MID.fullmatch(key):
            side, kind, j, rest = m.group(1), m.group(2), int(m.group(3)), m.group(4)
            if kind == "resnets":
                new = f"{side}.mid.block_{j + 1}.{_vae_resnet(rest)}"
            else:
                name, tensor = _vae_attention(rest, tensor)
                new = f"{side}.mid.attn_1.{name}"
        else:
            raise ValueError(f"vae_to_ldm: no LDM name for VAE key {key!r}")
        out[new] = tensor
    return out


# --------------------------------------------------------------------------------------------
# Text encoder
# --------------------------------------------------------------------------------------------


def text_encoder_to_ldm(state_dict: dict) -> dict:
    """Rename a transformers ``CLIPTextModel`` state dict to the SD 1.x ``cond_stage_model.transformer`` names (no prefix).

    SD 1.x wraps the very same Hugging Face CLIP model, so only the ``text_model.`` level has to
    be present: transformers >= 5.6 saves ``CLIPTextModel`` flattened (``embeddings.*``), older
    versions and real checkpoints keep ``text_model.embeddings.*``. The ``position_ids`` buffer
    (written by old transformers) is dropped: it is ``arange(77)`` and current loaders reject it.
    """
    out = {}
    for key, tensor in state_dict.items():
        if key.endswith("embeddings.position_ids"):
            continue
        if key.startswith("text_projection") or key.startswith("visual"):
            raise ValueError(f"text_encoder_to_ldm: {key!r} is not part of an SD 1.x CLIPTextModel")
        out[key if key.startswith("text_model.") else f"text_model.{key}"] = tensor
    return out


# --------------------------------------------------------------------------------------------
# Whole pipeline
# --------------------------------------------------------------------------------------------

#: (sub-folder, weight file names tried in order, converter, LDM prefix)
_COMPONENTS = (
    ("unet", ("diffusion_pytorch_model.safetensors",), unet_to_ldm, UNET_PREFIX),
    ("vae", ("diffusion_pytorch_model.safetensors",), vae_to_ldm, VAE_PREFIX),
    ("text_encoder", ("model.safetensors",), text_encoder_to_ldm, TEXT_ENCODER_PREFIX),
)


def pipeline_to_ldm_checkpoint(folder, out_file) -> Path:
    """Write the UNet, VAE and text encoder of a diffusers SD 1.x folder as one LDM-layout ``.safetensors``.

    Tensors are copied unchanged (same dtype, same values); only names and the VAE attention
    shapes change. Sharded or ``.bin`` weights are not supported: re-save them as safetensors.
    Returns the path written.
    """
    from safetensors.torch import load_file, save_file

    folder, out_file = Path(folder), Path(out_file)
    checkpoint = {}
    for sub, names, convert, prefix in _COMPONENTS:
        path = next((folder / sub / n for n in names if (folder / sub / n).is_file()), None)
        if path is None:
            raise FileNotFoundError(f"{folder / sub}: none of {', '.join(names)} found")
        for key, tensor in convert(load_file(path)).items():
            # contiguous: safetensors refuses views, and the VAE reshape may produce one
            checkpoint[prefix + key] = tensor.contiguous()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(checkpoint, out_file, metadata={"format": "pt"})
    return out_file
