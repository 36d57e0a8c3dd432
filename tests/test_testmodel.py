"""The tiny offline Stable Diffusion model (sdbatch.testmodel) and its LDM-layout single file (sdbatch.ldm_checkpoint)."""

import hashlib
import json

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdbatch.testmodel import SDBATCH_DEFAULTS, build_tiny_model, main  # noqa: E402

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and the test machine may be shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, single_file) of one tiny model built for the whole module."""
    root = tmp_path_factory.mktemp("tiny-sd")
    single = root / "tiny-ldm.safetensors"
    folder = build_tiny_model(root / "tiny-sd", seed=0, single_file=single)
    return folder, single


@pytest.fixture(scope="module")
def pipe(tiny):
    """The tiny model loaded the ordinary way, offline."""
    pipeline = diffusers.StableDiffusionPipeline.from_pretrained(tiny[0], local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _render(pipeline, steps=4):
    """One 64×64 image as a float array, from a fixed per-item generator."""
    generator = torch.Generator("cpu").manual_seed(1234)
    return pipeline(PROMPT, num_inference_steps=steps, height=64, width=64, generator=generator, output_type="np").images


def _weight_hashes(folder):
    """sha256 of every .safetensors file under ``folder``, keyed by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*.safetensors"))
    }


def test_folder_layout(tiny):
    folder, _ = tiny
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert json.loads((folder / "sdbatch.json").read_text()) == SDBATCH_DEFAULTS
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["beta_schedule"], scheduler["beta_start"], scheduler["beta_end"]) == ("scaled_linear", 0.00085, 0.012)
    assert scheduler["num_train_timesteps"] == 1000
    assert set(_weight_hashes(folder)) == {
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    }
    assert not (folder / "tokenizer" / "tokenizer.json").exists()  # the hand-written files are what loads


def test_from_pretrained_renders_64px(pipe):
    assert pipe.vae_scale_factor == 8  # ControlNet needs the SD value
    assert tuple(pipe.unet.config.block_out_channels) == (32, 64)
    assert pipe.text_encoder.config.hidden_size == 32
    image = _render(pipe, steps=2)
    assert image.shape == (1, 64, 64, 3)
    assert ((image >= 0) & (image <= 1)).all()


def test_same_seed_same_bytes_via_cli(tiny, tmp_path):
    folder, single = tiny
    again = tmp_path / "again"
    assert main([str(again), "--seed", "0", "--single-file", str(tmp_path / "again.safetensors")]) == 0
    assert _weight_hashes(again) == _weight_hashes(folder)
    assert (tmp_path / "again.safetensors").read_bytes() == single.read_bytes()


def test_other_seed_other_weights(tiny, tmp_path):
    other = build_tiny_model(tmp_path / "seed1", seed=1)
    ours, theirs = _weight_hashes(tiny[0]), _weight_hashes(other)
    assert all(ours[name] != theirs[name] for name in ours)


def test_single_file_matches_folder(tiny, pipe):
    folder, single = tiny
    from safetensors import safe_open

    ldm_prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    with safe_open(single, "pt") as f:
        keys = list(f.keys())
    assert all(key.startswith(ldm_prefixes) for key in keys)
    assert all(any(key.startswith(prefix) for key in keys) for prefix in ldm_prefixes)

    loaded = diffusers.StableDiffusionPipeline.from_single_file(single, config=str(folder), local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert set(got) == set(want), name
        assert all(torch.equal(got[k], want[k]) for k in want), name
    assert (_render(loaded) == _render(pipe)).all()


def test_tokenizer_known_ids(tiny):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny[0] / "tokenizer")
    assert tokenizer.model_max_length == 77
    ids = tokenizer(PROMPT, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    vocab = tokenizer.get_vocab()
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]  # eos doubles as unk and pad, as in SD 1.x
    words = [vocab[w + "</w>"] for w in PROMPT.split()]  # every word is one known token
    assert ids == [bos, *words, eos] + [eos] * (77 - len(words) - 2)
    assert tokenizer.decode(ids, skip_special_tokens=True) == PROMPT
    # unknown words still encode (as byte pieces), without unk
    assert eos not in tokenizer("zebra xylophone", add_special_tokens=False).input_ids


def test_convert_matches_diffusers_loader_for_full_size_sd15():
    """Our diffusers→LDM names are what diffusers' own LDM→diffusers loader expects, at SD 1.5 size.

    Built on the meta device: no memory, no weights, only names and shapes.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from sdbatch.ldm_checkpoint import UNET_PREFIX, VAE_PREFIX, unet_to_ldm, vae_to_ldm

    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
        )
    unet_sd = unet.state_dict()
    ldm = unet_to_ldm(unet_sd)
    assert len(ldm) == 686  # the key count of the original SD 1.x UNet
    assert {"output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "middle_block.1.proj_in.weight"} <= set(ldm)
    back = convert_ldm_unet_checkpoint({UNET_PREFIX + k: v for k, v in ldm.items()}, unet.config)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in unet_sd.items()}

    vae_sd = vae.state_dict()
    ldm = vae_to_ldm(vae_sd)
    assert ldm["decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert "decoder.up.3.upsample.conv.weight" in ldm and "decoder.up.0.upsample.conv.weight" not in ldm
    back = convert_ldm_vae_checkpoint({VAE_PREFIX + k: v for k, v in ldm.items()}, vae.config)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in vae_sd.items()}


def test_convert_rejects_unknown_keys():
    from sdbatch.ldm_checkpoint import unet_to_ldm

    with pytest.raises(ValueError, match="class_embedding"):
        unet_to_ldm({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(1), "class_embedding.linear_1.weight": torch.zeros(1)})
