"""Tiny offline SDXL, SD3.5 and FLUX.1 models (sdbatch.testfamilies) and their original-layout single files."""

import hashlib
import json

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sdbatch.ldm_checkpoint import (  # noqa: E402
    UNET_PREFIX,
    flux_transformer_to_original,
    sd3_transformer_to_original,
    unet_to_ldm,
)
from sdbatch.testfamilies import SDBATCH_DEFAULTS, main  # noqa: E402

PROMPT = "a red circle on a blue background"
PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and the test machine may be shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=sorted(PIPELINES))
def family(request):
    """(name, folder) of each tiny family, from the session fixtures in conftest.py."""
    return request.param, request.getfixturevalue(f"tiny_{request.param}")


def _realigned(pipe):
    """``pipe`` with every weight copied into fresh memory, progress bar off.

    from_pretrained memory-maps safetensors, which can leave a weight at an address that is not
    64-byte aligned; CPU matmul kernels then take another path and round differently in the
    last bit (seen: SDXL's CLIP-G projection, 3e-7). Copying gives both pipelines the same
    alignment, so equal weights must give equal pixels.
    """
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in [*component.parameters(), *component.buffers()]:
                tensor.data = tensor.data.clone()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load(name, folder, **kwargs):
    return _realigned(getattr(diffusers, PIPELINES[name]).from_pretrained(folder, local_files_only=True, **kwargs))


def _render(pipe, seed=1234, prompt=PROMPT):
    """One 64×64 image as a float array, at the family's default guidance, from a fixed generator."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, num_inference_steps=2, height=64, width=64, generator=generator, output_type="np").images


def _weight_hashes(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.safetensors"))}


def _assert_same_weights(want, got, names):
    for name in names:
        a, b = getattr(want, name).state_dict(), getattr(got, name).state_dict()
        assert set(a) == set(b), name
        assert all(torch.equal(a[k], b[k]) for k in a), name


# --------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------


def test_folder_layout(family):
    name, folder = family
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINES[name]
    assert json.loads((folder / "sdbatch.json").read_text()) == SDBATCH_DEFAULTS[name]
    for sub in ("tokenizer", "tokenizer_2"):
        if index[sub][1] == "CLIPTokenizer":  # the hand-written BPE files are what loads
            assert not (folder / sub / "tokenizer.json").exists()
    vae = json.loads((folder / "vae" / "config.json").read_text())
    assert len(vae["block_out_channels"]) == 4  # scale factor 8, as every family
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    if name == "sdxl":
        assert vae["scaling_factor"] == 0.13025 and vae["latent_channels"] == 4
        assert scheduler["_class_name"] == "EulerDiscreteScheduler"
        assert (scheduler["timestep_spacing"], scheduler["steps_offset"], scheduler["beta_end"]) == ("leading", 1, 0.012)
        unet = json.loads((folder / "unet" / "config.json").read_text())
        assert unet["addition_embed_type"] == "text_time"
    else:
        assert vae["latent_channels"] == 16 and not vae["use_quant_conv"]
        assert (vae["scaling_factor"], vae["shift_factor"]) == ({"sd3": 1.5305, "flux": 0.3611}[name], {"sd3": 0.0609, "flux": 0.1159}[name])
        assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["shift"] == 3.0
        assert scheduler["use_dynamic_shifting"] == (name == "flux")


def test_renders_deterministically(family):
    name, folder = family
    pipe = _load(name, folder)
    image = _render(pipe)
    assert image.shape == (1, 64, 64, 3) and ((image >= 0) & (image <= 1)).all()
    assert (_render(pipe) == image).all()
    assert not (_render(pipe, seed=1) == image).all()
    assert not (_render(pipe, prompt="a green tree") == image).all()  # the prompt reaches the denoiser


def test_sd3_loads_and_renders_without_t5(tiny_sd3, tiny_sd3_single_file):
    without = _load("sd3", tiny_sd3, text_encoder_3=None, tokenizer_3=None)
    assert without.text_encoder_3 is None
    image = _render(without)
    assert image.shape == (1, 64, 64, 3)
    assert not (image == _render(_load("sd3", tiny_sd3))).all()  # T5 contributes when present
    # the single file, T5 dropped the same way, renders the same pixels
    single = _realigned(diffusers.StableDiffusion3Pipeline.from_single_file(
        tiny_sd3_single_file, config=str(tiny_sd3), local_files_only=True, torch_dtype=torch.float32,
        text_encoder_3=None, tokenizer_3=None))
    assert single.text_encoder_3 is None
    assert (_render(single) == image).all()


def test_same_seed_same_bytes_via_cli(tiny_sdxl, tiny_sdxl_single_file, tmp_path):
    again = tmp_path / "again"
    assert main(["sdxl", str(again), "--seed", "0", "--single-file", str(tmp_path / "again.safetensors")]) == 0
    assert _weight_hashes(again) == _weight_hashes(tiny_sdxl)
    assert (tmp_path / "again.safetensors").read_bytes() == tiny_sdxl_single_file.read_bytes()


def test_make_test_model_command_builds_each_family(tmp_path, capsys):
    from sdbatch.cli import main as sdbatch_main

    assert sdbatch_main(["make-test-model", str(tmp_path / "sd3"), "--family", "sd3", "--seed", "2"]) == 0
    assert json.loads((tmp_path / "sd3" / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    assert "tiny sd3 test model written to" in capsys.readouterr().out


def test_other_seed_other_weights(tiny_flux, tmp_path):
    from sdbatch.testfamilies import build_tiny_flux

    ours, theirs = _weight_hashes(tiny_flux), _weight_hashes(build_tiny_flux(tmp_path / "seed1", seed=1))
    assert set(ours) == set(theirs) and all(ours[n] != theirs[n] for n in ours)


def test_t5_tokenizer(tiny_sd3):
    from transformers import T5Tokenizer

    tokenizer = T5Tokenizer.from_pretrained(tiny_sd3 / "tokenizer_3")
    vocab = tokenizer.get_vocab()
    assert (vocab["<pad>"], vocab["</s>"], vocab["<unk>"]) == (0, 1, 2)  # T5's fixed ids
    ids = tokenizer(PROMPT).input_ids
    assert ids == [vocab["▁" + w] for w in PROMPT.split()] + [1]  # one piece per known word, then </s>
    assert 2 not in tokenizer("zebra Xylophone 42!").input_ids  # anything else spells out, no <unk>
    assert tokenizer.decode(ids, skip_special_tokens=True) == PROMPT


@pytest.mark.parametrize("name", ["sdxl", "sd3"])
def test_clip_g_tokenizer_pads_with_exclamation_mark(name, request):
    from transformers import CLIPTokenizer

    folder = request.getfixturevalue(f"tiny_{name}")
    first, second = (CLIPTokenizer.from_pretrained(folder / sub) for sub in ("tokenizer", "tokenizer_2"))
    assert (first.pad_token, second.pad_token) == ("<|endoftext|>", "!")  # CLIP-L pads with its end token, CLIP-G with "!"
    assert second("a cat", padding="max_length", max_length=6).input_ids[-1] == second.get_vocab()["!"]


# --------------------------------------------------------------------------------------------
# Single files
# --------------------------------------------------------------------------------------------

PREFIXES = {
    "sdxl": ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
             "conditioner.embedders.1.model."),
    "sd3": ("model.diffusion_model.joint_blocks.", "first_stage_model.", "text_encoders.clip_l.transformer.text_model.",
            "text_encoders.clip_g.transformer.text_model.", "text_encoders.t5xxl.transformer."),
    "flux": ("model.diffusion_model.double_blocks.", "vae.", "text_encoders.clip_l.transformer.text_model.",
             "text_encoders.t5xxl.transformer."),
}


def test_single_file_key_layout(family):
    from safetensors import safe_open

    name, folder = family
    with safe_open(folder.parent / f"{name}.safetensors", "pt") as f:
        keys = list(f.keys())
    # every key belongs to a component, every component is there
    assert all(key.startswith(tuple(p.split(".")[0] + "." for p in PREFIXES[name])) for key in keys)
    assert all(any(key.startswith(prefix) for key in keys) for prefix in PREFIXES[name])
    if name == "sdxl":  # diffusers' own SDXL detection key (CLIP-G has 10 layers for it)
        assert "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias" in keys
    if name == "flux":
        assert "model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale" in keys
        assert "model.diffusion_model.guidance_in.in_layer.weight" in keys  # FLUX.1-dev, not schnell


@pytest.mark.parametrize("name", ["sdxl", "sd3"])
def test_single_file_loads_identical_weights_and_pixels(name, request):
    folder, single = request.getfixturevalue(f"tiny_{name}"), request.getfixturevalue(f"tiny_{name}_single_file")
    pipe = _load(name, folder)
    loaded = _realigned(getattr(diffusers, PIPELINES[name]).from_single_file(
        single, config=str(folder), local_files_only=True, torch_dtype=torch.float32))
    modules = [n for n, c in pipe.components.items() if isinstance(c, torch.nn.Module)]
    assert len(modules) == {"sdxl": 4, "sd3": 5}[name]
    _assert_same_weights(pipe, loaded, modules)
    assert (_render(loaded) == _render(pipe)).all()


def test_flux_single_file_vae_and_text_encoders(tiny_flux, tiny_flux_single_file):
    """The VAE, CLIP-L and T5 of the FLUX file load identically through diffusers' single-file readers."""
    from diffusers.loaders.single_file_utils import (
        create_diffusers_clip_model_from_ldm,
        create_diffusers_t5_model_from_checkpoint,
        load_single_file_checkpoint,
    )
    from transformers import CLIPTextModel, T5EncoderModel

    pipe = _load("flux", tiny_flux)
    checkpoint = load_single_file_checkpoint(str(tiny_flux_single_file), local_files_only=True)
    vae = diffusers.AutoencoderKL.from_single_file(str(tiny_flux_single_file), config=str(tiny_flux), subfolder="vae", local_files_only=True)
    clip = create_diffusers_clip_model_from_ldm(CLIPTextModel, checkpoint, subfolder="text_encoder", config=str(tiny_flux), local_files_only=True)
    t5 = create_diffusers_t5_model_from_checkpoint(T5EncoderModel, checkpoint, subfolder="text_encoder_2", config=str(tiny_flux), local_files_only=True)
    loaded = type("Loaded", (), {"vae": vae, "text_encoder": clip, "text_encoder_2": t5})
    _assert_same_weights(pipe, loaded, ["vae", "text_encoder", "text_encoder_2"])


def _row_labelled(shapes: dict) -> dict:
    """Tensors of the given leading sizes (other dims 1) whose every row holds a different number.

    Name changes, fusing/splitting along dim 0 and half swaps all move whole rows, so comparing
    these checks where every row goes, at full model size and almost no memory.
    """
    out, start = {}, 0
    for key, shape in shapes.items():
        rows = shape[0] if len(shape) else 1
        out[key] = torch.arange(start, start + rows, dtype=torch.float64).reshape(rows, *([1] * (len(shape) - 1)))
        start += rows
    return out


@pytest.mark.parametrize("arch", ["flux", "sd35_medium"])
def test_transformer_layout_is_the_inverse_of_diffusers_reader_at_full_size(arch):
    """Our diffusers→original renaming undone by diffusers' own original→diffusers converter, row for row.

    Full-size FLUX.1-dev and SD3.5-medium widths, two blocks, on the meta device; this is also
    the check for FLUX, whose diffusers converter only accepts the full width (3072).
    """
    from diffusers.loaders import single_file_utils as sfu

    with torch.device("meta"):
        if arch == "flux":
            model = diffusers.FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
        else:
            model = diffusers.SD3Transformer2DModel(num_layers=2, dual_attention_layers=(0,), qk_norm="rms_norm", pos_embed_max_size=384)
    to_original = flux_transformer_to_original if arch == "flux" else sd3_transformer_to_original
    reader = sfu.convert_flux_transformer_checkpoint_to_diffusers if arch == "flux" else sfu.convert_sd3_transformer_checkpoint_to_diffusers
    wanted = model.state_dict()
    original = _row_labelled({k: v.shape for k, v in to_original(wanted).items()})
    back = reader({UNET_PREFIX + k: v for k, v in original.items()})
    assert {k: v.shape[0] if v.ndim else 1 for k, v in back.items()} == {k: v.shape[0] if v.ndim else 1 for k, v in wanted.items()}
    again = to_original(back)
    assert set(again) == set(original) and all(torch.equal(again[k], original[k]) for k in original)


def test_unet_layout_matches_diffusers_reader_for_full_size_sdxl():
    """SDXL's UNet at full size (3 levels, 10 transformer layers, ``label_emb``), names and shapes, on the meta device."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
    wanted = unet.state_dict()
    ldm = unet_to_ldm(wanted)
    assert {"label_emb.0.0.weight", "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight", "output_blocks.2.2.conv.weight"} <= set(ldm)
    back = convert_ldm_unet_checkpoint({UNET_PREFIX + k: v for k, v in ldm.items()}, unet.config)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in wanted.items()}
