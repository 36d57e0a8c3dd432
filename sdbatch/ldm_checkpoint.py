"""Write diffusers test pipelines as original-layout single-file checkpoints (for tests).

Single-file checkpoints shared as ``model.safetensors`` (A1111, ComfyUI, Civitai, the model
authors' own releases) use the key names of each family's original code base, prefixed per
component. ``from_single_file`` in diffusers reads only those layouts, so the tiny test models
(``sdbatch.testmodel``, ``sdbatch.testfamilies``) are written here in them, to test single-file
loading offline. These are the reverse of diffusers' ``loaders.single_file_utils`` converters:

* SD 1.x: ``model.diffusion_model.`` (LDM UNet: ``input_blocks``/``middle_block``/``output_blocks``),
  ``first_stage_model.`` (LDM VAE: ``encoder.down.{i}.block.{j}``, ``mid.attn_1`` ...),
  ``cond_stage_model.transformer.`` (CLIP, same names as transformers).
* SDXL: the same UNet and VAE names (plus ``label_emb`` for the size/crop embedding),
  ``conditioner.embedders.0.transformer.`` (CLIP-L, transformers names) and
  ``conditioner.embedders.1.model.`` (CLIP-G in OpenCLIP names: ``transformer.resblocks``, fused ``in_proj``).
* SD3/SD3.5: ``model.diffusion_model.`` (MMDiT: ``joint_blocks.{i}.x_block``/``context_block``, fused ``qkv``),
  ``first_stage_model.``, ``text_encoders.clip_l.transformer.``, ``text_encoders.clip_g.transformer.``,
  ``text_encoders.t5xxl.transformer.`` (transformers names).
* FLUX.1: ``model.diffusion_model.`` (BFL: ``double_blocks``/``single_blocks``, fused ``qkv`` and ``linear1``),
  ``vae.``, ``text_encoders.clip_l.transformer.``, ``text_encoders.t5xxl.transformer.`` (ComfyUI's all-in-one layout).

The functions are pure key/shape remapping over ``{name: tensor}`` dicts; tensors keep their
values and dtype. They infer the block structure from the keys, so they work at full size as well
as for tiny test models. Unknown keys raise ``ValueError`` rather than being dropped.
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
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's size/crop ("text_time") embedding
    "add_embedding.linear_2": "label_emb.0.2",
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
            raise ValueError(f"unet_to_ldm: no LDM name for UNet key {key!r} (only SD 1.x/SDXL-style UNets are supported)")
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



def clip_with_projection_to_hf(state_dict: dict, keep_projection: bool = True) -> dict:
    """A ``CLIPTextModelWithProjection`` state dict in the checkpoint names of SD3/FLUX (``text_model.*``, ``text_projection.weight``).

    SD3's and FLUX's CLIP-L carry no projection in their checkpoints (diffusers loads an identity
    matrix in its place): with ``keep_projection=False`` the projection must be an identity and is left out.
    """
    import torch

    body = {k: v for k, v in state_dict.items() if not k.startswith("text_projection")}
    out = text_encoder_to_ldm(body)
    projection = state_dict.get("text_projection.weight")
    if projection is None:
        return out
    if keep_projection:
        out["text_projection.weight"] = projection
    elif not torch.equal(projection, torch.eye(*projection.shape, dtype=projection.dtype)):
        raise ValueError("clip_with_projection_to_hf: this layout stores no CLIP-L projection; it must be the identity")
    return out


#: transformers CLIP names -> OpenCLIP names, inside one encoder layer.
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_OPEN_CLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_CLIP_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_CLIP_QKV = re.compile(r"self_attn\.([qkv])_proj")


def clip_to_open_clip(state_dict: dict) -> dict:
    """Rename a transformers ``CLIPTextModelWithProjection`` state dict to OpenCLIP names (SDXL's CLIP-G, no prefix).

    OpenCLIP fuses the q, k and v projections into one ``attn.in_proj_weight`` (q, k, v stacked
    along the output dimension) and stores the text projection transposed, as a bare matrix.
    """
    import torch

    out, qkv = {}, {}
    for key, tensor in text_encoder_to_ldm({k: v for k, v in state_dict.items() if k != "text_projection.weight"}).items():
        if key in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[key]] = tensor
        elif (m := _CLIP_LAYER.fullmatch(key)) and (q := _CLIP_QKV.fullmatch(m.group(2))):
            qkv.setdefault((m.group(1), m.group(3)), {})[q.group(1)] = tensor
        elif m and m.group(2) in _OPEN_CLIP_LAYER:
            out[f"transformer.resblocks.{m.group(1)}.{_OPEN_CLIP_LAYER[m.group(2)]}.{m.group(3)}"] = tensor
        else:
            raise ValueError(f"clip_to_open_clip: no OpenCLIP name for CLIP key {key!r}")
    for (layer, param), parts in qkv.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if "text_projection.weight" in state_dict:
        out["text_projection"] = state_dict["text_projection.weight"].T
    return out


# --------------------------------------------------------------------------------------------
# Transformers (SD3 MMDiT, FLUX.1)
# --------------------------------------------------------------------------------------------

#: (diffusers key pattern, original key template, slot in a fused tensor or None), first match wins.
#: A slot means several diffusers tensors are concatenated along dim 0, in slot order, into one.
_SD3_RULES = (
    (r"pos_embed\.pos_embed", "pos_embed", None),
    (r"pos_embed\.proj\.(\w+)", r"x_embedder.proj.\1", None),
    (r"time_text_embed\.timestep_embedder\.linear_1\.(\w+)", r"t_embedder.mlp.0.\1", None),
    (r"time_text_embed\.timestep_embedder\.linear_2\.(\w+)", r"t_embedder.mlp.2.\1", None),
    (r"time_text_embed\.text_embedder\.linear_1\.(\w+)", r"y_embedder.mlp.0.\1", None),
    (r"time_text_embed\.text_embedder\.linear_2\.(\w+)", r"y_embedder.mlp.2.\1", None),
    (r"context_embedder\.(\w+)", r"context_embedder.\1", None),
    (r"proj_out\.(\w+)", r"final_layer.linear.\1", None),
    (r"norm_out\.linear\.(\w+)", r"final_layer.adaLN_modulation.1.\1", None),
    (r"transformer_blocks\.(\d+)\.attn\.to_q\.(\w+)", r"joint_blocks.\1.x_block.attn.qkv.\2", 0),
    (r"transformer_blocks\.(\d+)\.attn\.to_k\.(\w+)", r"joint_blocks.\1.x_block.attn.qkv.\2", 1),
    (r"transformer_blocks\.(\d+)\.attn\.to_v\.(\w+)", r"joint_blocks.\1.x_block.attn.qkv.\2", 2),
    (r"transformer_blocks\.(\d+)\.attn\.add_q_proj\.(\w+)", r"joint_blocks.\1.context_block.attn.qkv.\2", 0),
    (r"transformer_blocks\.(\d+)\.attn\.add_k_proj\.(\w+)", r"joint_blocks.\1.context_block.attn.qkv.\2", 1),
    (r"transformer_blocks\.(\d+)\.attn\.add_v_proj\.(\w+)", r"joint_blocks.\1.context_block.attn.qkv.\2", 2),
    (r"transformer_blocks\.(\d+)\.attn\.norm_q\.(\w+)", r"joint_blocks.\1.x_block.attn.ln_q.\2", None),
    (r"transformer_blocks\.(\d+)\.attn\.norm_k\.(\w+)", r"joint_blocks.\1.x_block.attn.ln_k.\2", None),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_q\.(\w+)", r"joint_blocks.\1.context_block.attn.ln_q.\2", None),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_k\.(\w+)", r"joint_blocks.\1.context_block.attn.ln_k.\2", None),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0\.(\w+)", r"joint_blocks.\1.x_block.attn.proj.\2", None),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out\.(\w+)", r"joint_blocks.\1.context_block.attn.proj.\2", None),
    (r"transformer_blocks\.(\d+)\.attn2\.to_q\.(\w+)", r"joint_blocks.\1.x_block.attn2.qkv.\2", 0),
    (r"transformer_blocks\.(\d+)\.attn2\.to_k\.(\w+)", r"joint_blocks.\1.x_block.attn2.qkv.\2", 1),
    (r"transformer_blocks\.(\d+)\.attn2\.to_v\.(\w+)", r"joint_blocks.\1.x_block.attn2.qkv.\2", 2),
    (r"transformer_blocks\.(\d+)\.attn2\.norm_q\.(\w+)", r"joint_blocks.\1.x_block.attn2.ln_q.\2", None),
    (r"transformer_blocks\.(\d+)\.attn2\.norm_k\.(\w+)", r"joint_blocks.\1.x_block.attn2.ln_k.\2", None),
    (r"transformer_blocks\.(\d+)\.attn2\.to_out\.0\.(\w+)", r"joint_blocks.\1.x_block.attn2.proj.\2", None),
    (r"transformer_blocks\.(\d+)\.norm1\.linear\.(\w+)", r"joint_blocks.\1.x_block.adaLN_modulation.1.\2", None),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear\.(\w+)", r"joint_blocks.\1.context_block.adaLN_modulation.1.\2", None),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.(\w+)", r"joint_blocks.\1.x_block.mlp.fc1.\2", None),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2\.(\w+)", r"joint_blocks.\1.x_block.mlp.fc2.\2", None),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj\.(\w+)", r"joint_blocks.\1.context_block.mlp.fc1.\2", None),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2\.(\w+)", r"joint_blocks.\1.context_block.mlp.fc2.\2", None),
)

_FLUX_RULES = (
    (r"time_text_embed\.timestep_embedder\.linear_1\.(\w+)", r"time_in.in_layer.\1", None),
    (r"time_text_embed\.timestep_embedder\.linear_2\.(\w+)", r"time_in.out_layer.\1", None),
    (r"time_text_embed\.text_embedder\.linear_1\.(\w+)", r"vector_in.in_layer.\1", None),
    (r"time_text_embed\.text_embedder\.linear_2\.(\w+)", r"vector_in.out_layer.\1", None),
    (r"time_text_embed\.guidance_embedder\.linear_1\.(\w+)", r"guidance_in.in_layer.\1", None),
    (r"time_text_embed\.guidance_embedder\.linear_2\.(\w+)", r"guidance_in.out_layer.\1", None),
    (r"context_embedder\.(\w+)", r"txt_in.\1", None),
    (r"x_embedder\.(\w+)", r"img_in.\1", None),
    (r"proj_out\.(\w+)", r"final_layer.linear.\1", None),
    (r"norm_out\.linear\.(\w+)", r"final_layer.adaLN_modulation.1.\1", None),
    (r"transformer_blocks\.(\d+)\.norm1\.linear\.(\w+)", r"double_blocks.\1.img_mod.lin.\2", None),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear\.(\w+)", r"double_blocks.\1.txt_mod.lin.\2", None),
    (r"transformer_blocks\.(\d+)\.attn\.to_q\.(\w+)", r"double_blocks.\1.img_attn.qkv.\2", 0),
    (r"transformer_blocks\.(\d+)\.attn\.to_k\.(\w+)", r"double_blocks.\1.img_attn.qkv.\2", 1),
    (r"transformer_blocks\.(\d+)\.attn\.to_v\.(\w+)", r"double_blocks.\1.img_attn.qkv.\2", 2),
    (r"transformer_blocks\.(\d+)\.attn\.add_q_proj\.(\w+)", r"double_blocks.\1.txt_attn.qkv.\2", 0),
    (r"transformer_blocks\.(\d+)\.attn\.add_k_proj\.(\w+)", r"double_blocks.\1.txt_attn.qkv.\2", 1),
    (r"transformer_blocks\.(\d+)\.attn\.add_v_proj\.(\w+)", r"double_blocks.\1.txt_attn.qkv.\2", 2),
    (r"transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"double_blocks.\1.img_attn.norm.query_norm.scale", None),
    (r"transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"double_blocks.\1.img_attn.norm.key_norm.scale", None),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_q\.weight", r"double_blocks.\1.txt_attn.norm.query_norm.scale", None),
    (r"transformer_blocks\.(\d+)\.attn\.norm_added_k\.weight", r"double_blocks.\1.txt_attn.norm.key_norm.scale", None),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0\.(\w+)", r"double_blocks.\1.img_attn.proj.\2", None),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out\.(\w+)", r"double_blocks.\1.txt_attn.proj.\2", None),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.(\w+)", r"double_blocks.\1.img_mlp.0.\2", None),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2\.(\w+)", r"double_blocks.\1.img_mlp.2.\2", None),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj\.(\w+)", r"double_blocks.\1.txt_mlp.0.\2", None),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2\.(\w+)", r"double_blocks.\1.txt_mlp.2.\2", None),
    (r"single_transformer_blocks\.(\d+)\.norm\.linear\.(\w+)", r"single_blocks.\1.modulation.lin.\2", None),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_q\.(\w+)", r"single_blocks.\1.linear1.\2", 0),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_k\.(\w+)", r"single_blocks.\1.linear1.\2", 1),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_v\.(\w+)", r"single_blocks.\1.linear1.\2", 2),
    (r"single_transformer_blocks\.(\d+)\.proj_mlp\.(\w+)", r"single_blocks.\1.linear1.\2", 3),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_q\.weight", r"single_blocks.\1.norm.query_norm.scale", None),
    (r"single_transformer_blocks\.(\d+)\.attn\.norm_k\.weight", r"single_blocks.\1.norm.key_norm.scale", None),
    (r"single_transformer_blocks\.(\d+)\.proj_out\.(\w+)", r"single_blocks.\1.linear2.\2", None),
)


def _swap_halves(tensor):
    """Original code orders adaLN outputs (shift, scale); diffusers' AdaLayerNormContinuous (scale, shift)."""
    import torch

    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first])


def _apply_rules(state_dict: dict, rules, swapped, name: str) -> dict:
    """Rename through ``rules``, concatenate fused slots, then swap the halves of keys matching ``swapped``."""
    import torch

    compiled = [(re.compile(pattern), template, slot) for pattern, template, slot in rules]
    out, fused = {}, {}
    for key, tensor in state_dict.items():
        for pattern, template, slot in compiled:
            if m := pattern.fullmatch(key):
                new = m.expand(template)
                if slot is None:
                    out[new] = tensor
                else:
                    fused.setdefault(new, {})[slot] = tensor
                break
        else:
            raise ValueError(f"{name}: no original name for key {key!r}")
    for new, parts in fused.items():
        out[new] = torch.cat([parts[i] for i in range(len(parts))])
    return {k: _swap_halves(v) if swapped.fullmatch(k) else v for k, v in out.items()}


def sd3_transformer_to_original(state_dict: dict) -> dict:
    """Rename a diffusers ``SD3Transformer2DModel`` state dict to the MMDiT names of SD3/SD3.5 checkpoints (no prefix).

    The last joint block's context stream only modulates its input (no output projection or MLP),
    and its adaLN is an ``AdaLayerNormContinuous`` whose halves are swapped, like the final layer's.
    """
    last = max(int(m.group(1)) for k in state_dict if (m := re.match(r"transformer_blocks\.(\d+)\.", k)))
    swapped = re.compile(rf"final_layer\.adaLN_modulation\.1\.\w+|joint_blocks\.{last}\.context_block\.adaLN_modulation\.1\.\w+")
    return _apply_rules(state_dict, _SD3_RULES, swapped, "sd3_transformer_to_original")


def flux_transformer_to_original(state_dict: dict) -> dict:
    """Rename a diffusers ``FluxTransformer2DModel`` state dict to the names of Black Forest Labs' FLUX.1 checkpoints (no prefix).

    A single block's q, k, v and MLP input projections are one ``linear1`` in the original.
    """
    swapped = re.compile(r"final_layer\.adaLN_modulation\.1\.\w+")
    return _apply_rules(state_dict, _FLUX_RULES, swapped, "flux_transformer_to_original")


def t5_to_original(state_dict: dict) -> dict:
    """A transformers ``T5EncoderModel`` state dict as SD3/FLUX checkpoints store it: the same names.

    transformers 5 saves the tied input embedding once, as ``shared.weight``; checkpoints written
    by older versions also hold ``encoder.embed_tokens.weight``, and diffusers' single-file T5
    loader needs it (it does not re-tie weights, and would leave that embedding empty).
    """
    out = {k: v.clone() for k, v in state_dict.items()}
    if "shared.weight" in out:
        out.setdefault("encoder.embed_tokens.weight", out["shared.weight"].clone())
    return out


# --------------------------------------------------------------------------------------------
# Whole pipeline
# --------------------------------------------------------------------------------------------

#: Per pipeline class: (sub-folder, converter, prefix in the single file). Missing sub-folders
#: (e.g. SD3 saved without T5) are left out of the file.
LAYOUTS = {
    "StableDiffusionPipeline": (
        ("unet", unet_to_ldm, UNET_PREFIX),
        ("vae", vae_to_ldm, VAE_PREFIX),
        ("text_encoder", text_encoder_to_ldm, TEXT_ENCODER_PREFIX),
    ),
    "StableDiffusionXLPipeline": (
        ("unet", unet_to_ldm, UNET_PREFIX),
        ("vae", vae_to_ldm, VAE_PREFIX),
        ("text_encoder", text_encoder_to_ldm, "conditioner.embedders.0.transformer."),
        ("text_encoder_2", clip_to_open_clip, "conditioner.embedders.1.model."),
    ),
    "StableDiffusion3Pipeline": (
        ("transformer", sd3_transformer_to_original, UNET_PREFIX),
        ("vae", vae_to_ldm, VAE_PREFIX),
        ("text_encoder", lambda sd: clip_with_projection_to_hf(sd, keep_projection=False), "text_encoders.clip_l.transformer."),
        ("text_encoder_2", clip_with_projection_to_hf, "text_encoders.clip_g.transformer."),
        ("text_encoder_3", t5_to_original, "text_encoders.t5xxl.transformer."),
    ),
    "FluxPipeline": (
        ("transformer", flux_transformer_to_original, UNET_PREFIX),
        ("vae", vae_to_ldm, "vae."),
        ("text_encoder", text_encoder_to_ldm, "text_encoders.clip_l.transformer."),
        ("text_encoder_2", t5_to_original, "text_encoders.t5xxl.transformer."),
    ),
}

def _component_weights(folder: Path, sub: str) -> dict:
    """All tensors of one component folder's safetensors weights (sharded files merged)."""
    from safetensors.torch import load_file

    files = sorted((folder / sub).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder / sub}: no .safetensors weights found")
    weights = {}
    for path in files:
        weights.update(load_file(path))
    return weights


def write_original_checkpoint(folder, out_file, components=None) -> Path:
    """Write a diffusers pipeline folder as one original-layout ``.safetensors`` and return its path.

    The layout follows ``model_index.json``'s pipeline class (see ``LAYOUTS``). ``components``
    limits which sub-folders are written (e.g. an SD3 file without T5, as SD3 is also shipped).
    Tensors are copied unchanged in value and dtype; only names (and fused/transposed layouts) change.
    """
    import json

    from safetensors.torch import save_file

    folder, out_file = Path(folder), Path(out_file)
    pipeline = json.loads((folder / "model_index.json").read_text())["_class_name"]
    if pipeline not in LAYOUTS:
        raise ValueError(f"{folder}: no original single-file layout known for {pipeline} (known: {', '.join(LAYOUTS)})")
    checkpoint = {}
    for sub, convert, prefix in LAYOUTS[pipeline]:
        if (components is not None and sub not in components) or not (folder / sub).is_dir():
            continue
        for key, tensor in convert(_component_weights(folder, sub)).items():
            # contiguous: safetensors refuses views (reshapes, transposes, chunks)
            checkpoint[prefix + key] = tensor.contiguous()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(checkpoint, out_file, metadata={"format": "pt"})
    return out_file

