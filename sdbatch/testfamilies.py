"""Tiny random SDXL, SD3.5-architecture and FLUX.1-architecture models, built offline, for tests.

Each builder writes a complete diffusers folder that its diffusers pipeline loads with
``from_pretrained(folder, local_files_only=True)`` and renders 64×64 in a fraction of a second
on a CPU. The components have the real architecture of the family (two CLIP encoders and the
size/crop embedding for SDXL; CLIP-L, CLIP-G and T5 with an MMDiT for SD3.5; CLIP-L and T5 with a
guidance-distilled double/single-stream transformer and packed 16-channel latents for FLUX.1),
at tiny widths. Weights are a pure function of ``seed``; the caller's RNG state is untouched.
With ``single_file=``, the same weights are also written as one ``.safetensors`` in the family's
original checkpoint layout (see ``sdbatch.ldm_checkpoint``).

Tokenizers are built offline too: the CLIP ones are ``sdbatch.testmodel``'s byte-level BPE,
the T5 one a small Unigram vocabulary (the same words, plus single characters so any text encodes).

Command line::

    python -m sdbatch.testfamilies sdxl|sd3|flux OUT_DIR [--single-file FILE] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from sdbatch.testmodel import BOS, EOS, SD_TRAINING_BETAS, WORDS, _tiny_text_encoder, _tiny_vae, build_bpe, write_tokenizer

#: ``sdbatch.json`` defaults per family. The flow-matching families name no sampler: their
#: scheduler folder holds the one they were built with.
SDBATCH_DEFAULTS = {
    "sdxl": {"width": 64, "height": 64, "steps": 4, "guidance": 5.0, "sampler": "Euler"},
    "sd3": {"width": 64, "height": 64, "steps": 4, "guidance": 4.5},
    "flux": {"width": 64, "height": 64, "steps": 4, "guidance": 3.5},
}

#: T5's special tokens, in the ids every T5 tokenizer gives them.
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
#: Characters with a T5 piece of their own, so that no text needs ``<unk>``.
T5_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()-_/&+*=#%@<>[]{}|~^$"


# --------------------------------------------------------------------------------------------
# Text encoders and tokenizers
# --------------------------------------------------------------------------------------------


def _clip_g(vocab: dict[str, int], hidden: int, layers: int):
    """An OpenCLIP-G-shaped text encoder with projection: GELU, padded with ``!`` (as SDXL's and SD3's)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=hidden,  # as CLIP-G: 1280 -> 1280
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab["!"],
    )
    return CLIPTextModelWithProjection(config).eval()


def _clip_l_with_projection(vocab: dict[str, int]):
    """SD3's CLIP-L: ``sdbatch.testmodel``'s encoder with an identity projection (SD3 checkpoints store none)."""
    import torch
    from transformers import CLIPTextModelWithProjection

    model = CLIPTextModelWithProjection(_tiny_text_encoder(vocab).config).eval()
    with torch.no_grad():
        model.text_projection.weight.copy_(torch.eye(model.config.projection_dim, model.config.hidden_size))
    return model


def _t5_vocab(words=WORDS) -> list[tuple[str, float]]:
    """A SentencePiece-style Unigram vocabulary: specials, then ``▁word`` pieces, then single characters.

    Whole words score higher than the characters that spell them, so a known word is one piece.
    """
    pieces = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0 - i * 1e-3) for i, w in enumerate(dict.fromkeys(words))]
    pieces += [(c, -10.0) for c in T5_CHARS] + [("▁" + c, -9.0) for c in T5_CHARS]
    return pieces


def write_t5_tokenizer(folder, words=WORDS, max_length: int = 512) -> Path:
    """Write a T5 tokenizer (``tokenizer.json`` and config) that ``T5Tokenizer.from_pretrained`` loads offline."""
    from transformers import T5Tokenizer

    tokenizer = T5Tokenizer(vocab=_t5_vocab(words), extra_ids=0, model_max_length=max_length)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def _tiny_t5(vocab_size: int, d_model: int):
    """A 2-layer T5 v1.1 encoder (gated GELU, as the t5-xxl encoder SD3 and FLUX use)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=16,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


# --------------------------------------------------------------------------------------------
# Denoisers
# --------------------------------------------------------------------------------------------


def _sdxl_unet(cross_attention_dim: int, pooled_dim: int):
    """An SDXL-shaped UNet at two levels: no attention at the top (as SDXL), linear projections,
    two transformer layers at the lowest level, and the ``text_time`` size/crop embedding."""
    from diffusers import UNet2DConditionModel

    time_embed_dim = 8  # SDXL: 256 per each of the 6 size/crop numbers
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + pooled_dim,
        norm_num_groups=32,
    )


def _sd3_transformer(joint_dim: int, pooled_dim: int):
    """An SD3.5-medium-shaped MMDiT: RMS q/k norms, a dual-attention first block, patch size 2."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=joint_dim,
        caption_projection_dim=32,  # = heads * head dim, as in SD3
        pooled_projection_dim=pooled_dim,
        pos_embed_max_size=32,  # up to 512×512
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )


def _flux_transformer(joint_dim: int, pooled_dim: int):
    """A FLUX.1-dev-shaped transformer: one double-stream and two single-stream blocks, guidance embedding."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2×2
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=joint_dim,
        pooled_projection_dim=pooled_dim,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),  # sums to the head dim, as FLUX's (16, 56, 56) to 128
    )


# --------------------------------------------------------------------------------------------
# Schedulers (the families' shipped configs)
# --------------------------------------------------------------------------------------------


def _sdxl_scheduler():
    """Euler with SDXL base 1.0's scheduler config."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        **SD_TRAINING_BETAS,
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        prediction_type="epsilon",
        use_karras_sigmas=False,
    )


def _sd3_scheduler():
    """Flow-matching Euler with SD3's shift 3.0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def _flux_scheduler():
    """Flow-matching Euler with FLUX.1-dev's resolution-dependent (dynamic) shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
    )


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------

#: Widths of the tiny encoders. CLIP-L and CLIP-G differ in width because diffusers' single-file
#: loader tells them apart by their position-embedding width.
CLIP_L_WIDTH, CLIP_G_WIDTH, T5_WIDTH = 32, 48, 96
#: CLIP-G layers: 10, so diffusers' SDXL detection key (``resblocks.9``) exists in the single file.
CLIP_G_LAYERS = 10


def _flow_vae(scaling_factor: float, shift_factor: float):
    """The 16-channel VAE of SD3 and FLUX.1 (scale factor 8, no quant convs), with the family's latent scaling and shift."""
    return _tiny_vae(4, latent_channels=16, scaling_factor=scaling_factor, shift_factor=shift_factor,
                     use_quant_conv=False, use_post_quant_conv=False)


def _seeded(seed: int, make):
    """``make()`` with the global torch RNG seeded, inside fork_rng so the caller's stream is unchanged."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def _save(pipe, folder: Path, family: str, clip_tokenizers: dict[str, str]) -> None:
    """save_pretrained, then the hand-written CLIP tokenizers (save_pretrained adds a tokenizer.json that would win on load)."""
    pipe.save_pretrained(folder, safe_serialization=True)
    for name, pad in clip_tokenizers.items():
        shutil.rmtree(folder / name)
        write_tokenizer(folder / name, pad_token=pad)
    (folder / "sdbatch.json").write_text(json.dumps(SDBATCH_DEFAULTS[family], indent=2) + "\n")


def _clip_tokenizer(tmp: Path, pad: str = EOS):
    """The offline CLIP tokenizer, written to ``tmp`` and loaded back."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(write_tokenizer(tmp, pad_token=pad))


def _t5_tokenizer(tmp: Path, max_length: int):
    """The offline T5 tokenizer, written to ``tmp`` and loaded back."""
    from transformers import T5Tokenizer

    return T5Tokenizer.from_pretrained(write_t5_tokenizer(tmp, max_length=max_length))


def build_tiny_sdxl(folder, seed: int = 0, single_file=None) -> Path:
    """Write a tiny random SDXL pipeline to ``folder`` (diffusers layout) and return it.

    ``StableDiffusionXLPipeline.from_pretrained(folder)`` loads it. With ``single_file``, the
    same weights are also written there in the SDXL checkpoint layout (``model.diffusion_model.``,
    ``first_stage_model.``, ``conditioner.embedders.0.transformer.``, ``conditioner.embedders.1.model.``).
    """
    from diffusers import StableDiffusionXLPipeline

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, _ = build_bpe()

    def make():
        vae = _tiny_vae(4, scaling_factor=0.13025, force_upcast=True)  # SDXL's VAE settings
        text_encoder = _tiny_text_encoder(vocab)
        text_encoder_2 = _clip_g(vocab, CLIP_G_WIDTH, CLIP_G_LAYERS)
        unet = _sdxl_unet(CLIP_L_WIDTH + CLIP_G_WIDTH, CLIP_G_WIDTH)
        return vae, text_encoder, text_encoder_2, unet

    vae, text_encoder, text_encoder_2, unet = _seeded(seed, make)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=_clip_tokenizer(folder / "tokenizer"),
        tokenizer_2=_clip_tokenizer(folder / "tokenizer_2", pad="!"),
        unet=unet,
        scheduler=_sdxl_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    _save(pipe, folder, "sdxl", {"tokenizer": EOS, "tokenizer_2": "!"})
    return _single_file(folder, single_file)


def build_tiny_sd3(folder, seed: int = 0, single_file=None) -> Path:
    """Write a tiny random SD3.5-architecture pipeline to ``folder`` (diffusers layout) and return it.

    ``StableDiffusion3Pipeline.from_pretrained(folder)`` loads it, also with
    ``text_encoder_3=None, tokenizer_3=None`` (T5 dropped). With ``single_file``, the same weights
    are also written there in the SD3 checkpoint layout (``model.diffusion_model.``,
    ``first_stage_model.``, ``text_encoders.clip_l|clip_g|t5xxl.transformer.``).
    """
    from diffusers import StableDiffusion3Pipeline

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, _ = build_bpe()

    def make():
        vae = _flow_vae(scaling_factor=1.5305, shift_factor=0.0609)  # SD3's
        text_encoder = _clip_l_with_projection(vocab)
        text_encoder_2 = _clip_g(vocab, CLIP_G_WIDTH, 2)
        text_encoder_3 = _tiny_t5(len(_t5_vocab()), T5_WIDTH)
        # CLIP-L and CLIP-G hidden states are joined and zero-padded to T5's width; the pooled
        # vectors are joined.
        transformer = _sd3_transformer(T5_WIDTH, CLIP_L_WIDTH + CLIP_G_WIDTH)
        return vae, text_encoder, text_encoder_2, text_encoder_3, transformer

    vae, text_encoder, text_encoder_2, text_encoder_3, transformer = _seeded(seed, make)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=_sd3_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_clip_tokenizer(folder / "tokenizer"),
        text_encoder_2=text_encoder_2,
        tokenizer_2=_clip_tokenizer(folder / "tokenizer_2", pad="!"),
        text_encoder_3=text_encoder_3,
        tokenizer_3=_t5_tokenizer(folder / "tokenizer_3", max_length=256),
    )
    _save(pipe, folder, "sd3", {"tokenizer": EOS, "tokenizer_2": "!"})  # as SD3's reference code pads
    return _single_file(folder, single_file)


def build_tiny_flux(folder, seed: int = 0, single_file=None) -> Path:
    """Write a tiny random FLUX.1-dev-architecture pipeline to ``folder`` (diffusers layout) and return it.

    ``FluxPipeline.from_pretrained(folder)`` loads it. With ``single_file``, the same weights are
    also written there in ComfyUI's all-in-one FLUX layout (``model.diffusion_model.`` in Black
    Forest Labs' names, ``vae.``, ``text_encoders.clip_l|t5xxl.transformer.``). diffusers 0.42
    cannot read that file's transformer at this size (its FLUX converter assumes a width of 3072).
    """
    from diffusers import FluxPipeline

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, _ = build_bpe()

    def make():
        vae = _flow_vae(scaling_factor=0.3611, shift_factor=0.1159)  # FLUX.1's
        text_encoder = _tiny_text_encoder(vocab)
        text_encoder_2 = _tiny_t5(len(_t5_vocab()), T5_WIDTH)
        transformer = _flux_transformer(T5_WIDTH, CLIP_L_WIDTH)
        return vae, text_encoder, text_encoder_2, transformer

    vae, text_encoder, text_encoder_2, transformer = _seeded(seed, make)
    pipe = FluxPipeline(
        scheduler=_flux_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_clip_tokenizer(folder / "tokenizer"),
        text_encoder_2=text_encoder_2,
        tokenizer_2=_t5_tokenizer(folder / "tokenizer_2", max_length=512),
        transformer=transformer,
    )
    _save(pipe, folder, "flux", {"tokenizer": EOS})
    return _single_file(folder, single_file)


def _single_file(folder: Path, single_file) -> Path:
    """Also write ``folder`` as an original-layout single file when one is asked for."""
    if single_file is not None:
        from sdbatch.ldm_checkpoint import write_original_checkpoint

        write_original_checkpoint(folder, single_file)
    return folder


BUILDERS = {"sdxl": build_tiny_sdxl, "sd3": build_tiny_sd3, "flux": build_tiny_flux}


def build_tiny_controlnet(folder, model_folder, family: str, seed: int = 0, hint: bool = False) -> Path:
    """Write a random ControlNet of ``family``'s diffusers class for the tiny model in ``model_folder``.

    It starts from the denoiser's weights as diffusers' ``from_unet``/``from_transformer`` do;
    its zero-initialised layers are drawn at random instead, so it steers from the start (a
    zero ControlNet adds nothing and would pass any test vacuously). ``hint`` makes a FLUX net
    XLabs-style: it reads the map itself through a convolutional hint block, not its latents.
    """
    import torch
    from diffusers import (ControlNetModel, FluxControlNetModel, FluxTransformer2DModel, SD3ControlNetModel,
                           SD3Transformer2DModel, UNet2DConditionModel)

    model_folder, folder = Path(model_folder), Path(folder)

    def make():
        if family in ("sd1", "sdxl"):
            net = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(model_folder / "unet"))
            zeroed = [net.controlnet_cond_embedding.conv_out, net.controlnet_mid_block, *net.controlnet_down_blocks]
        elif family == "sd3":
            transformer = SD3Transformer2DModel.from_pretrained(model_folder / "transformer")
            net = SD3ControlNetModel.from_transformer(transformer, num_layers=1, num_extra_conditioning_channels=0)
            zeroed = [net.pos_embed_input, *net.controlnet_blocks]
        elif family == "flux":
            transformer = FluxTransformer2DModel.from_pretrained(model_folder / "transformer")
            config = transformer.config
            net = FluxControlNetModel.from_transformer(transformer, num_layers=1, num_single_layers=1,
                                                       attention_head_dim=config.attention_head_dim,
                                                       num_attention_heads=config.num_attention_heads)
            if hint:  # 16 channels at 1/8 size, taken in 2x2 patches: the packed latents' 64
                net = FluxControlNetModel.from_config({**net.config, "conditioning_embedding_channels": 16,
                                                       "patch_size": 2})
            zeroed = [net.controlnet_x_embedder, *net.controlnet_blocks, *net.controlnet_single_blocks]
        else:
            raise ValueError(f"no tiny ControlNet for family {family}")
        for parameter in (p for layer in zeroed for p in layer.parameters()):
            torch.nn.init.normal_(parameter, std=0.2)
        return net

    _seeded(seed, make).save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    """``python -m sdbatch.testfamilies sdxl|sd3|flux OUT_DIR [--single-file FILE] [--seed N]``."""
    parser = argparse.ArgumentParser(prog="python -m sdbatch.testfamilies", description=__doc__.split("\n\n")[0])
    parser.add_argument("family", choices=sorted(BUILDERS), help="model family to build")
    parser.add_argument("out_dir", type=Path, help="folder to write the diffusers model into")
    parser.add_argument("--single-file", type=Path, help="also write an original-layout .safetensors checkpoint here")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    args = parser.parse_args(argv)
    folder = BUILDERS[args.family](args.out_dir, seed=args.seed, single_file=args.single_file)
    print(folder)
    if args.single_file:
        print(args.single_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
