"""Tiny random Stable Diffusion 1.x models, built offline, for tests and examples.

``build_tiny_model(folder)`` writes a complete diffusers folder (UNet, VAE, CLIP text encoder,
CLIP BPE tokenizer, SD 1.x scheduler) with random weights that are a pure function of ``seed``.
It loads with ``StableDiffusionPipeline.from_pretrained(folder)`` and renders 64×64 images in a
fraction of a second on a CPU. With ``single_file=`` the same weights are also written as one
LDM-layout ``.safetensors`` checkpoint for ``from_single_file(file, config=folder)``.
The SDXL, SD3 and FLUX.1 test models are in ``sdbatch.testfamilies``.

Command line::

    python -m sdbatch.testmodel OUT_DIR [--single-file FILE] [--seed N] [--vae-blocks N]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

#: Model defaults sdbatch reads from ``<model>/sdbatch.json``.
SDBATCH_DEFAULTS = {"width": 64, "height": 64, "steps": 4, "guidance": 7.0, "sampler": "Euler a"}

#: Words that become single BPE tokens (lower case; order decides the merge ranks).
#: Anything else still tokenizes, as smaller pieces down to single bytes.
WORDS = (
    "a red circle on blue background "
    "the an of in with and or at by for to from is are this that it its "
    "green yellow orange purple pink black white gray grey brown gold silver dark light bright "
    "square triangle star line dot shape small large big tiny huge "
    "photo photograph painting drawing sketch portrait landscape picture image art style "
    "cat dog bird horse fish tree flower house car city street mountain river lake sea ocean sky "
    "sun moon cloud forest field road beach snow rain night day morning evening "
    "man woman person face girl boy child people hand eye hair "
    "high quality detailed realistic beautiful old new blurry ugly simple "
    "left right top bottom center middle front back over under near"
).split()

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def _byte_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses for bytes 0..255, in byte order.

    Bytes that are visible, non-space Latin-1 characters stand for themselves; the rest
    (controls, space, soft hyphen ...) are moved to code points 256 and up, so every token is a
    printable string. This is the convention of GPT-2/CLIP and of the ``tokenizers`` ByteLevel
    pre-tokenizer, which maps input text this way before BPE sees it.
    """
    visible = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    chars, shifted = [], 0
    for byte in range(256):
        if byte in visible:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: repeatedly join the adjacent pair with the lowest merge rank."""
    while len(symbols) > 1:
        pairs = {(a, b) for a, b in zip(symbols, symbols[1:]) if (a, b) in ranks}
        if not pairs:
            break
        best = min(pairs, key=ranks.__getitem__)
        joined, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                joined.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                joined.append(symbols[i])
                i += 1
        symbols = joined
    return symbols


def build_bpe(words=WORDS) -> tuple[dict[str, int], list[str]]:
    """A small CLIP-style BPE vocabulary in which every word of ``words`` is one token: ``(vocab, merges)``.

    Layout follows CLIP's: the 256 byte characters, the same with the end-of-word marker
    ``</w>``, then one token per merge, then ``<|startoftext|>`` and ``<|endoftext|>`` last.
    Words are added in order: a word is first encoded with the merges so far (earlier words'
    merges may already join some of its letters), then merges joining those pieces left to
    right are appended. Appended merges rank after every earlier one, so they never change how
    an earlier word encodes, and each word ends up as a single token.
    """
    alphabet = _byte_alphabet()
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(alphabet)})
    merges: list[str] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = [alphabet[b] for b in word.lower().encode("utf-8")]
        symbols[-1] += "</w>"
        pieces = _apply_merges(symbols, ranks)
        left = pieces[0]
        for right in pieces[1:]:
            ranks[(left, right)] = len(merges)
            merges.append(f"{left} {right}")
            vocab.setdefault(left + right, len(vocab))
            left += right
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def write_tokenizer(folder, words=WORDS, pad_token: str = EOS) -> Path:
    """Write a CLIP tokenizer (``vocab.json``, ``merges.txt`` and configs) that ``CLIPTokenizer.from_pretrained`` loads.

    The files are written by hand rather than through ``CLIPTokenizer(vocab_file=...)``:
    transformers 5.x ignores those arguments silently and builds an empty vocabulary.
    Like SD 1.x's tokenizer, it pads with ``<|endoftext|>`` to ``model_max_length`` 77
    (SDXL's second tokenizer pads with ``!``: pass ``pad_token``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_bpe(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
              "clean_up_tokenization_spaces": False, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def _tiny_unet(sample_size: int):
    """A two-level SD 1.x-shaped UNet: attention at the top level only, 32-dim cross-attention."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,  # as SD 1.x, so the LDM block numbering is the real one
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=32,
    )


def _tiny_vae(blocks: int, latent_channels: int = 4, **config):
    """An SD-shaped KL autoencoder; ``blocks`` levels give a scale factor of 2**(blocks-1).

    ``config`` adds AutoencoderKL settings of other families (scaling and shift factors, no
    quant convs ...).
    """
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=tuple(32 if i < 2 else 64 for i in range(blocks)),
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=64,
        **config,
    )


def _tiny_text_encoder(vocab: dict[str, int]):
    """A 2-layer CLIP text transformer, hidden size 32, 77 positions, with our BOS/EOS ids."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",  # SD 1.x (OpenAI CLIP) activation
        projection_dim=32,
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],  # pooling looks for this id
        pad_token_id=vocab[EOS],
    )
    return CLIPTextModel(config).eval()


#: The noise schedule SD 1.x and SDXL were trained with.
SD_TRAINING_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def _sd1_scheduler():
    """PNDM with the Stable Diffusion 1.x training schedule (as shipped in SD 1.5's scheduler/)."""
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        **SD_TRAINING_BETAS,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_tiny_model(folder, seed: int = 0, single_file=None, vae_blocks: int = 4) -> Path:
    """Write a tiny random SD 1.x pipeline to ``folder`` (diffusers layout, safetensors) and return it.

    Weights are a pure function of ``seed``: the same seed writes byte-identical weight files.
    The caller's global torch RNG state is left untouched. With ``single_file``, the same
    weights are also written there in the original LDM layout (see ``sdbatch.ldm_checkpoint``).
    """
    import torch
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = write_tokenizer(folder / "tokenizer")
    vocab, _ = build_bpe()

    # Model constructors draw their initial weights from the global RNG: seed it, but inside
    # fork_rng so that building a model in a test does not change the test's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = _tiny_vae(vae_blocks)
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        unet = _tiny_unet(sample_size=SDBATCH_DEFAULTS["width"] // scale)
        text_encoder = _tiny_text_encoder(vocab)

    from transformers import CLIPTokenizer

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        unet=unet,
        scheduler=_sd1_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    # save_pretrained adds a tokenizer.json, which would take precedence on load: keep only the
    # hand-written files, so what loads is exactly what write_tokenizer wrote.
    shutil.rmtree(tokenizer_dir)
    write_tokenizer(tokenizer_dir)
    (folder / "sdbatch.json").write_text(json.dumps(SDBATCH_DEFAULTS, indent=2) + "\n")

    if single_file is not None:
        from sdbatch.ldm_checkpoint import write_original_checkpoint

        write_original_checkpoint(folder, single_file)
    return folder


def build_tiny_controlnet(model_folder, folder, seed: int = 0, zero_init: bool = False) -> Path:
    """A ControlNet for a model folder's U-Net, saved as a diffusers ControlNet folder.

    It copies the U-Net's encoder, as ControlNet training starts; its conditioning embedding
    downsamples by the model's VAE factor. Unless ``zero_init``, the zero convolutions get
    small random weights, so a random test net visibly changes the output (a fresh,
    zero-initialised one would add nothing and every control test would pass vacuously).
    """
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    model_folder, folder = Path(model_folder), Path(folder)
    unet = UNet2DConditionModel.from_pretrained(model_folder / "unet")
    vae_config = json.loads((model_folder / "vae" / "config.json").read_text())
    downsamples = len(vae_config["block_out_channels"]) - 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8,) + (16,) * downsamples)
        if not zero_init:
            for block in list(net.controlnet_down_blocks) + [net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
                torch.nn.init.normal_(block.weight, std=0.05)
    net.save_pretrained(folder, safe_serialization=True)
    return folder


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    """``python -m sdbatch.testmodel OUT_DIR [--single-file FILE] [--seed N] [--vae-blocks N]``."""
    parser = argparse.ArgumentParser(prog="python -m sdbatch.testmodel", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to write the diffusers model into")
    parser.add_argument("--single-file", type=Path, help="also write an LDM-layout .safetensors checkpoint here")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    parser.add_argument("--vae-blocks", type=int, default=4, help="VAE levels; 4 gives scale factor 8 (default)")
    args = parser.parse_args(argv)
    folder = build_tiny_model(args.out_dir, seed=args.seed, single_file=args.single_file, vae_blocks=args.vae_blocks)
    print(folder)
    if args.single_file:
        print(args.single_file)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
