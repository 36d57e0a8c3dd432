"""Model families: sdbatch renders each family as its diffusers pipeline does, per item.

Parity is checked on tiny random models of each architecture (built offline, once per
session); the SD 1.x parity runs on the shipped sdbatch-tiny as well.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from sdbatch import hookimpl
from sdbatch.job import JobError, load_job
from sdbatch.render import Renderer

pytestmark = pytest.mark.slow

#: family -> (pipeline class, guidance, sdbatch sampler, whether it has a negative prompt)
FAMILIES = {
    "sd1": ("StableDiffusionPipeline", 7.5, "Euler", True),
    "sdxl": ("StableDiffusionXLPipeline", 5.0, "Euler", True),
    "sd3": ("StableDiffusion3Pipeline", 4.5, "Flow Euler", True),
    "flux": ("FluxPipeline", 3.5, "Flow Euler", False),
}


@pytest.fixture
def family_model(request, tiny_model):
    """The tiny model folder of the family named by the test's parameter."""
    name = request.param
    return name, (tiny_model if name == "sd1" else request.getfixturevalue(f"tiny_{name}"))


def _job(write_job, folder, family: str, seeds=(5, 6, 7), extra: str = ""):
    _, guidance, sampler, negative = FAMILIES[family]
    negative_line = 'negative_prompt: "blurry"' if negative else ""
    return write_job(f"""
        model: {folder}
        prompt: "a red circle on blue background"
        {negative_line}
        sampler: "{sampler}"
        steps: 3
        guidance: {guidance}
        width: 64
        height: 64
        sweep:
          seed: {list(seeds)}
        {extra}
    """, f"{family}.yaml")


def _pipeline_pixels(family: str, folder, seeds, negative: bool, registry):
    """What the family's diffusers pipeline renders for the same items (one generator per item)."""
    import diffusers
    import torch

    cls, guidance, sampler, _ = FAMILIES[family]
    pipe = getattr(diffusers, cls).from_pretrained(str(folder), local_files_only=True, torch_dtype=torch.float32)
    pipe.scheduler = registry.require("sampler", sampler).obj.create(pipe.scheduler.config)
    kwargs = {"negative_prompt": ["blurry"] * len(seeds)} if negative else {}
    if family == "sd1":
        pipe.safety_checker = None
    images = pipe(["a red circle on blue background"] * len(seeds), num_inference_steps=3, guidance_scale=guidance,
                  height=64, width=64, generator=[torch.Generator().manual_seed(s) for s in seeds],
                  output_type="np", **kwargs).images
    return [(image * 255).round().astype("uint8") for image in images]


@pytest.mark.parametrize("family_model", list(FAMILIES), indirect=True)
def test_pixels_match_the_family_pipeline_and_ignore_the_batch(family_model, write_job, registry):
    family, folder = family_model
    job = load_job(_job(write_job, folder, family), registry)
    info = next(iter(job.plan.models.values()))
    assert info.family == family  # detected from model_index.json
    items = list(job.plan)
    renderer = Renderer(registry, "cpu", "float32", job.plan.models)
    together = [np.asarray(r.image) for r in renderer.render(items)]
    alone = [np.asarray(renderer.render([item])[0].image) for item in items]
    for a, b in zip(together, alone):
        assert np.array_equal(a, b)  # batch composition never changes pixels
    expected = _pipeline_pixels(family, folder, [item.seed for item in items], FAMILIES[family][3], registry)
    for ours, theirs in zip(alone, expected):
        # sdbatch's CPU kernels are row-independent (per-row GEMMs, oneDNN off): results can differ
        # from the batched pipeline in the last float bits, so at most one level in 255.
        difference = np.abs(ours.astype(int) - theirs.astype(int))
        print(f"{family}: max difference {difference.max()}, mean {difference.mean():.4f}")
        assert difference.max() <= 1, family
    assert len({a.tobytes() for a in alone}) == len(alone)  # seeds change the picture


def test_flux_single_file_is_detected_from_its_tensor_names(write_job, registry, tiny_flux, tiny_flux_single_file):
    # (diffusers 0.42 cannot load a FLUX transformer narrower than 3072 from a single file, so no render here)
    job = load_job(_job(write_job, tiny_flux_single_file, "flux", seeds=(3,), extra=f"model_config: {tiny_flux}"),
                   registry)
    assert job.plan.models[str(tiny_flux_single_file)].family == "flux"


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_single_file_is_detected_and_renders_like_its_folder(family, write_job, registry, request):
    folder = request.getfixturevalue(f"tiny_{family}")
    single = request.getfixturevalue(f"tiny_{family}_single_file")
    folder_job = load_job(_job(write_job, folder, family, seeds=(3,)), registry)
    file_job = load_job(_job(write_job, single, family, seeds=(3,), extra=f"model_config: {folder}"), registry)
    info = file_job.plan.models[str(single)]
    assert (info.kind, info.family) == ("single-file", family)  # detected from the file's tensor names
    a = Renderer(registry, "cpu", "float32", folder_job.plan.models).render(list(folder_job.plan))[0]
    b = Renderer(registry, "cpu", "float32", file_job.plan.models).render(list(file_job.plan))[0]
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_sd3_without_t5_renders_and_is_another_item(write_job, registry, tiny_sd3):
    with_t5 = load_job(_job(write_job, tiny_sd3, "sd3", seeds=(3,)), registry)
    without = load_job(_job(write_job, tiny_sd3, "sd3", seeds=(3,), extra="memory: {t5: 'off'}"), registry)
    a, b = with_t5.plan.item_at(0), without.plan.item_at(0)
    assert a.id != b.id  # the T5 setting changes pixels, so it is part of the id
    renderer_a = Renderer(registry, "cpu", "float32", with_t5.plan.models)
    renderer_b = Renderer(registry, "cpu", "float32", without.plan.models)
    model = renderer_b.model_for(b)
    assert model.components["text_encoder_3"] is None
    pixels_a = np.asarray(renderer_a.render([a])[0].image)
    pixels_b = np.asarray(renderer_b.render([b])[0].image)
    assert not np.array_equal(pixels_a, pixels_b)


@pytest.mark.parametrize("family,conditioner,message", [
    ("flux", "inpaint: {image: x.png, mask: m.png}", "FLUX.1 Fill"),
])
def test_a_capability_that_does_not_apply_stops_at_its_line(family, conditioner, message, write_job, registry,
                                                            request):
    folder = request.getfixturevalue(f"tiny_{family}")
    from PIL import Image

    path = write_job(f"""
        model: {folder}
        prompt: "a circle"
        conditioners:
          - text
          - {conditioner}
    """)
    for name in ("x.png", "m.png"):
        Image.new("RGB", (64, 64)).save(path.parent / name)
    with pytest.raises(JobError) as error:
        load_job(path, registry)
    text = str(error.value)
    assert message in text and ":5:" in text, text  # at the conditioner's line


def test_a_sampler_of_the_other_kind_is_refused_with_those_that_fit(write_job, registry, tiny_flux, tiny_model):
    with pytest.raises(JobError) as error:
        load_job(write_job(f"model: {tiny_flux}\nsampler: Euler a\n"), registry)
    assert "does not fit FLUX.1" in str(error.value) and "Flow Euler" in str(error.value)
    with pytest.raises(JobError) as error:
        load_job(write_job(f"model: {tiny_model}\nsampler: Flow Euler\n"), registry)
    assert "does not fit Stable Diffusion 1.x/2.x" in str(error.value)


def test_local_basis_on_flux_names_the_reason(write_job, registry, tiny_flux):
    path = write_job(f"""
        model: {tiny_flux}
        edit:
          source: {{prompt: "a circle", seed: 1}}
          directions:
            - {{kind: local-basis, count: 1}}
    """)
    with pytest.raises(JobError) as error:
        load_job(path, registry)
    assert "local-basis edits need a U-Net mid-block; FLUX.1 has" in str(error.value)


def test_mid_block_features_equal_the_sdxl_unets_own(registry, write_job, tiny_sdxl):
    """Local-basis edits differentiate the U-Net's bottleneck; on SDXL it must see the pooled and size inputs."""
    import torch

    from sdbatch_plugins.directions import mid_block_features

    job = load_job(_job(write_job, tiny_sdxl, "sdxl", seeds=(1,)), registry)
    model = Renderer(registry, "cpu", "float32", job.plan.models).model_for(job.plan.item_at(0))
    cond = {name: value[None] for name, value in model.encode_prompt("a red circle").items()}
    x_t = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(2))
    inputs = model.family.unet_inputs(model, x_t[None], cond, 64, 64)
    seen = []
    hook = model.unet.mid_block.register_forward_hook(lambda module, args, output: seen.append(output))
    try:
        with torch.no_grad():
            model.unet(x_t[None], torch.tensor([500]), **inputs)
    finally:
        hook.remove()
    with torch.no_grad():
        ours = mid_block_features(model.unet, x_t, 500, inputs)
        added = inputs["added_cond_kwargs"]
        other = {**inputs, "added_cond_kwargs": {**added, "text_embeds": torch.zeros_like(added["text_embeds"])}}
        without_pooled = mid_block_features(model.unet, x_t, 500, other)
    assert torch.allclose(ours, seen[0][0], atol=1e-5)
    assert not torch.allclose(without_pooled, seen[0][0], atol=1e-3)  # the added conditioning matters


@pytest.mark.parametrize("direction", [
    "{kind: local-basis, prompt: 'a circle', timestep: 0.5, count: 1, iterations: 3}",
    "{kind: sega, prompt: 'blue', warmup: 0}",
])
def test_sdxl_local_basis_and_sega_edits_render(direction, write_job, registry, tiny_sdxl):
    edit = write_job(f"""
        model: {tiny_sdxl}
        steps: 3
        guidance: 5
        width: 64
        height: 64
        edit:
          source: {{prompt: "a red circle on blue background", seed: 7}}
          directions:
            - {direction}
          strengths: [-1, 0, 1]
    """, "edit.yaml")
    still = write_job(f"""
        model: {tiny_sdxl}
        steps: 3
        guidance: 5
        width: 64
        height: 64
        sampler: DDIM
        prompt: "a red circle on blue background"
        seed: 7
    """, "still.yaml")
    job, plain = load_job(edit, registry), load_job(still, registry)
    renderer = Renderer(registry, "cpu", "float32", {**job.plan.models, **plain.plan.models})
    items = list(job.plan)
    edited = {i.extra["edit"]["strength"]: np.asarray(r.image) for i, r in zip(items, renderer.render(items))}
    unedited = np.asarray(renderer.render([plain.plan.item_at(0)])[0].image)
    assert np.array_equal(edited[0.0], unedited)
    assert not np.array_equal(edited[1.0], unedited) and not np.array_equal(edited[-1.0], unedited)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_kill_9_then_resume_is_byte_identical_per_family(family, request, write_job, tmp_path, kill_run_after):
    import subprocess
    import sys

    from sdbatch.cli import main

    folder = request.getfixturevalue(f"tiny_{family}")
    job = _job(write_job, folder, family, seeds=range(1, 25), extra="batch_size: 4\n        outputs: [png]\n        threads: 1")
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    assert main(["run", str(job), "-o", str(clean), "-q"]) == 0
    finished = kill_run_after(job, killed, finished=3, timeout=300)
    assert 0 < finished < 24
    resumed = subprocess.run([sys.executable, "-m", "sdbatch", "run", str(job), "-o", str(killed), "-q"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr

    def pngs(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}

    files = pngs(clean)
    assert len(files) == 24 and pngs(killed) == files


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_t5_reads_a1111_syntax_with_weights_and_long_context(family, request, write_job, registry, capsys):
    import torch
    from transformers import AutoTokenizer

    from sdbatch_plugins.prompts import apply_emphasis, t5_tokens

    folder = request.getfixturevalue(f"tiny_{family}")
    t5_name = "tokenizer_3" if family == "sd3" else "tokenizer_2"
    tokenizer = AutoTokenizer.from_pretrained(folder / t5_name)
    plain = "a red circle on blue background"
    ids, weights, cut = t5_tokens(tokenizer, plain + " <lora:ink:0.5> BREAK", 64)
    assert ids == tokenizer(plain, padding="max_length", max_length=64, truncation=True).input_ids  # the pipeline's
    assert set(weights) == {1.0} and not cut
    ids, weights, _ = t5_tokens(tokenizer, "a (red:1.5) circle on [blue] background", 64)
    assert ids == tokenizer(plain, padding="max_length", max_length=64).input_ids
    assert 1.5 in weights and round(min(weights), 4) == round(1 / 1.1, 4)

    job = load_job(_job(write_job, folder, family, seeds=(1,)), registry)
    model = Renderer(registry, "cpu", "float32", job.plan.models).model_for(job.plan.item_at(0))
    states = model.encode_prompt(plain)["encoder_hidden_states"]
    weighted = model.encode_prompt("a (red:1.5) circle on [blue] background")["encoder_hidden_states"]
    t5_rows = slice(77, None) if family == "sd3" else slice(None)
    expected = apply_emphasis(states[t5_rows][None], torch.tensor([t5_tokens(tokenizer, "a (red:1.5) circle on "
                                                                              "[blue] background", 256 if family ==
                                                                              "sd3" else 512)[1]]))[0]
    assert torch.allclose(weighted[t5_rows], expected, atol=1e-6)  # A1111 emphasis on T5's states

    long = plain + ", " + ", ".join(["a small green square"] * 60)  # 307 T5 tokens
    late = "circle".join(long.rsplit("square", 1))  # only the last word changes, past token 256
    if family == "sd3":  # the pipeline's 256 tokens cut it (with a warning); t5_tokens: 512 reads it all
        model.encode_prompt(long)
        assert "cut to 256 T5 tokens" in capsys.readouterr().err
        longer, changed = (model.encode_prompt(text, t5_tokens=512)["encoder_hidden_states"] for text in (long, late))
        assert longer.shape[0] == 77 + 512
    else:  # FLUX.1 reads 512 by default
        longer, changed = (model.encode_prompt(text)["encoder_hidden_states"] for text in (long, late))
        assert longer.shape[0] == 512 and "cut to" not in capsys.readouterr().err
    t5_start = 77 if family == "sd3" else 0
    difference = (longer - changed).abs().sum(dim=-1)[t5_start:]
    assert int(difference.argmax()) > 256  # the changed word, past token 256, is read


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_t5_tokens_renders_and_reads_more(family, request, write_job, registry):
    folder = request.getfixturevalue(f"tiny_{family}")
    long = "a red circle on blue background, " + ", ".join(["a small green square"] * 60)  # 307 T5 tokens
    images = []
    for extra in ("", "conditioners: [{text: {t5_tokens: 512}}]"):
        job = load_job(write_job(f"""
            model: {folder}
            prompt: "{long}"
            sampler: Flow Euler
            steps: 2
            width: 64
            height: 64
            seed: 3
            {extra}
        """, f"t5-{bool(extra)}.yaml"), registry)
        images.append(np.asarray(Renderer(registry, "cpu", "float32", job.plan.models).render(list(job.plan))[0].image))
    # SD3 reads 256 tokens by default, so 512 reads more; FLUX.1 reads 512 already: the same picture
    assert np.array_equal(*images) == (family == "flux")


def test_t5_tokens_on_a_family_without_t5_stops_at_its_line(write_job, registry, tiny_model):
    path = write_job(f"""
        model: {tiny_model}
        prompt: a circle
        conditioners:
          - text: {{t5_tokens: 512}}
    """)
    with pytest.raises(JobError) as error:
        load_job(path, registry)
    assert "t5_tokens applies to families with a T5 encoder" in str(error.value) and ":4:" in str(error.value)


# ---------------------------------------------------------------- a family from a plugin
@dataclass
class _Recorder:
    calls: list


def test_a_plugin_family_renders_without_any_change_to_core(write_job, make_registry, tiny_model):
    """A third-party family (here: SD 1.x under another name that halves the guidance) plugs in."""
    from sdbatch_plugins.families import StableDiffusion

    calls = []

    class HalfGuidance(StableDiffusion):
        name = "half-guidance"
        description = "a test family"
        pipeline_classes = ()

        def denoise(self, model, x, t, cond, guidance, width=0, height=0, **kwargs):
            calls.append(tuple(guidance.tolist()))
            return super().denoise(model, x, t, cond, guidance, width, height, **kwargs)

    class Plugin:
        @hookimpl
        def register_families(self, register):
            register(HalfGuidance())

    registry = make_registry(Plugin())
    job = load_job(write_job(f"""
        model: {tiny_model}
        model_family: half-guidance
        prompt: "a red circle"
        steps: 2
        guidance: 6
    """), registry)
    assert next(iter(job.plan.models.values())).family == "half-guidance"
    result = Renderer(registry, "cpu", "float32", job.plan.models).render([job.plan.item_at(0)])[0]
    assert result.image.size == (64, 64)
    assert calls and calls[0] == (6.0, 6.0)  # the family received the doubled rows' guidance


def test_an_unknown_family_is_named_with_a_close_match(write_job, registry, tiny_model):
    with pytest.raises(JobError) as error:
        load_job(write_job(f"model: {tiny_model}\nmodel_family: sdx\n"), registry)
    assert "unknown family 'sdx'" in str(error.value) and "sdxl" in str(error.value)


def test_prepare_model_hook_sees_every_loaded_model(write_job, make_registry, tiny_model):
    seen = []

    class Plugin:
        @hookimpl
        def prepare_model(self, model):
            seen.append((model.family.name, type(model.unet).__name__))

    registry = make_registry(Plugin())
    job = load_job(write_job(f"model: {tiny_model}\nsteps: 1\n"), registry)
    Renderer(registry, "cpu", "float32", job.plan.models).render([job.plan.item_at(0)])
    assert seen == [("sd1", "UNet2DConditionModel")]


# ---------------------------------------------------------------- every option renders
@pytest.mark.parametrize("family_model", ["sd1", "sdxl"], indirect=True)
def test_clip_skip_renders_and_changes_the_picture(family_model, write_job, registry):
    family, folder = family_model
    pictures = []
    for skip in (1, 2):
        job = load_job(_job(write_job, folder, family, seeds=(4,),
                            extra=f"conditioners: [{{text: {{clip_skip: {skip}}}}}]"), registry)
        result = Renderer(registry, "cpu", "float32", job.plan.models).render(list(job.plan))[0]
        pictures.append(np.asarray(result.image))
    assert not np.array_equal(*pictures)


@pytest.mark.parametrize("family_model", ["sdxl", "sd3", "flux"], indirect=True)
def test_img2img_runs_on_every_family_that_has_it(family_model, write_job, registry):
    from PIL import Image

    family, folder = family_model
    source = np.zeros((64, 64, 3), dtype="uint8")
    source[16:48, 16:48] = (220, 30, 30)
    path = write_job("x: 1", "unused.yaml").parent / "input.png"
    Image.fromarray(source).save(path)
    images = {}
    for strength in (0.5, 1.0):
        job = load_job(_job(write_job, folder, family, seeds=(4,), extra=f"""
        conditioners:
          - text
          - img2img: {{image: {path}, strength: {strength}}}
        """), registry)
        renderer = Renderer(registry, "cpu", "float32", job.plan.models)
        first = np.asarray(renderer.render(list(job.plan))[0].image).astype(int)
        again = np.asarray(renderer.render(list(job.plan))[0].image).astype(int)
        assert np.array_equal(first, again)
        images[strength] = first
    # a low strength keeps more of the input than strength 1 (random weights, so only the order is claimed)
    assert np.abs(images[0.5] - source).mean() < np.abs(images[1.0] - source).mean()


@pytest.mark.parametrize("memory", ["{vae_tiling: true}", "{vae_slicing: true}", "{offload: model}",
                                    "{offload: sequential}"])
def test_memory_options_render(memory, write_job, registry, tiny_model):
    job = load_job(_job(write_job, tiny_model, "sd1", seeds=(4,), extra=f"memory: {memory}"), registry)
    plain = load_job(_job(write_job, tiny_model, "sd1", seeds=(4,)), registry)
    a = np.asarray(Renderer(registry, "cpu", "float32", job.plan.models).render(list(job.plan))[0].image)
    b = np.asarray(Renderer(registry, "cpu", "float32", plain.plan.models).render(list(plain.plan))[0].image)
    # at 64x64 tiling never splits, slicing and offloading (a no-op on CPU) keep the math: same pixels
    assert np.array_equal(a, b)


def test_an_uncached_hub_model_is_one_error_at_the_model_line(write_job, registry, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: the hub is unreachable
    path = write_job("prompt: a cat\nmodel: runwayml/stable-diffusion-v1-5\n")
    with pytest.raises(JobError) as error:
        load_job(path, registry)
    text = str(error.value)
    assert ":2:1:" in text and "not in the local cache" in text and "hf download runwayml/stable-diffusion-v1-5" in text
    assert text.count("runwayml/stable-diffusion-v1-5' is not") == 1


@pytest.mark.parametrize("name", ["sdxl", "sd3", "flux"])
def test_family_example_jobs_validate_offline(name, registry):
    from pathlib import Path

    job = load_job(Path(__file__).parent.parent / "jobs" / f"{name}.yaml", registry)
    info = next(iter(job.plan.models.values()))
    assert info.family == name and len(job.plan) >= 4


@pytest.mark.parametrize("family_model", ["sdxl", "sd3"], indirect=True)
def test_inpainting_keeps_every_unmasked_pixel(family_model, write_job, registry):
    from PIL import Image

    family, folder = family_model
    base = write_job("x: 1", "unused.yaml").parent
    source = np.full((64, 64, 3), 200, dtype="uint8")
    mask = np.zeros((64, 64), dtype="uint8")
    mask[16:48, 16:48] = 255
    Image.fromarray(source).save(base / "in.png")
    Image.fromarray(mask).save(base / "mask.png")
    job = load_job(_job(write_job, folder, family, seeds=(4,), extra=f"""
        conditioners:
          - text
          - inpaint: {{image: {base / 'in.png'}, mask: {base / 'mask.png'}, mask_blur: 0}}
        """), registry)
    image = np.asarray(Renderer(registry, "cpu", "float32", job.plan.models).render(list(job.plan))[0].image)
    assert np.array_equal(image[mask == 0], source[mask == 0])
    assert not np.array_equal(image[mask == 255], source[mask == 255])


CONTROLNET_PIPELINES = {"sdxl": ("StableDiffusionXLControlNetPipeline", "image"),
                        "sd3": ("StableDiffusion3ControlNetPipeline", "control_image"),
                        "flux": ("FluxControlNetPipeline", "control_image"),
                        "flux-xlabs": ("FluxControlNetPipeline", "control_image")}  # a hint-block net


def _controlnet_pipeline_pixels(kind, folder, net_folder, map_path, seeds, registry):
    """What the family's ControlNet pipeline renders for the same items (one generator per item).

    sdbatch encodes a transformer ControlNet's map to the VAE posterior's mean, where the
    pipelines sample it (SD3 from the global generator): the pipeline is made to take the mean too.
    """
    from unittest import mock

    import diffusers
    import torch
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from PIL import Image

    cls, image_arg = CONTROLNET_PIPELINES[kind]
    family = kind.split("-")[0]
    _, guidance, sampler, negative = FAMILIES[family]
    net = getattr(diffusers, _family_net_class(family)).from_pretrained(str(net_folder))
    pipe = getattr(diffusers, cls).from_pretrained(str(folder), controlnet=net, local_files_only=True,
                                                   torch_dtype=torch.float32)
    pipe.scheduler = registry.require("sampler", sampler).obj.create(pipe.scheduler.config)
    kwargs = {"negative_prompt": ["blurry"] * len(seeds)} if negative else {}
    with mock.patch.object(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode()):
        images = pipe(["a red circle on blue background"] * len(seeds), num_inference_steps=3,
                      guidance_scale=guidance, height=64, width=64, output_type="np",
                      generator=[torch.Generator().manual_seed(s) for s in seeds],
                      **{image_arg: Image.open(map_path).convert("RGB")}, **kwargs).images
    return [(image * 255).round().astype("uint8") for image in images]


def _family_net_class(family: str) -> str:
    from sdbatch_plugins.families import FAMILIES as BUILT_IN

    return next(f.controlnet_class for f in BUILT_IN if f.name == family)


@pytest.mark.parametrize("kind", list(CONTROLNET_PIPELINES))
def test_controlnets_match_the_family_pipeline_steer_and_scale_0_is_no_control(kind, write_job, registry,
                                                                             request, tmp_path):
    from PIL import Image

    from sdbatch.testfamilies import build_tiny_controlnet

    family = kind.split("-")[0]
    folder = request.getfixturevalue(f"tiny_{family}")
    net = build_tiny_controlnet(tmp_path / "cn", folder, family, hint=kind.endswith("xlabs"))
    edges = np.zeros((64, 64, 3), dtype="uint8")
    edges[20:44, 30:34] = 255
    Image.fromarray(edges).save(tmp_path / "map.png")

    def render(scale, seeds=(4,)):
        job = load_job(_job(write_job, folder, family, seeds=seeds, extra=f"""
        conditioners:
          - text
          - image: {{image: {tmp_path / 'map.png'}, controlnet: {net}, scale: {scale}}}
        """), registry)
        items = list(job.plan)
        renderer = Renderer(registry, "cpu", "float32", job.plan.models)
        together = [np.asarray(r.image) for r in renderer.render(items)]
        alone = [np.asarray(renderer.render([item])[0].image) for item in items]
        assert all(np.array_equal(a, b) for a, b in zip(together, alone))  # batch independence with a net
        return alone

    plain = load_job(_job(write_job, folder, family, seeds=(4,)), registry)
    without = np.asarray(Renderer(registry, "cpu", "float32", plain.plan.models).render(list(plain.plan))[0].image)
    assert np.array_equal(render(0.0)[0], without)
    steered = render(1.0, seeds=(4, 5))
    assert not np.array_equal(steered[0], without)
    expected = _controlnet_pipeline_pixels(kind, folder, net, tmp_path / "map.png", (4, 5), registry)
    for ours, theirs in zip(steered, expected):
        difference = np.abs(ours.astype(int) - theirs.astype(int))
        print(f"{kind} ControlNet: max difference {difference.max()}, mean {difference.mean():.4f}")
        assert difference.max() <= 1, family


def test_a_controlnet_of_another_family_is_refused_at_its_line(write_job, registry, tiny_sd3, tiny_flux, tmp_path):
    from PIL import Image

    from sdbatch.testfamilies import build_tiny_controlnet

    net = build_tiny_controlnet(tmp_path / "cn", tiny_flux, "flux")
    Image.new("RGB", (64, 64)).save(tmp_path / "map.png")
    path = _job(write_job, tiny_sd3, "sd3", seeds=(4,), extra=f"""
        conditioners:
          - text
          - image: {{image: {tmp_path / 'map.png'}, controlnet: {net}}}
        """)
    with pytest.raises(JobError) as error:
        load_job(path, registry)
    assert "is a FluxControlNetModel" in str(error.value) and "takes a SD3ControlNetModel" in str(error.value)


def test_flux_images_record_distilled_guidance_as_forge_does(write_job, registry, tiny_flux, tmp_path):
    from sdbatch.metadata import a1111_fields

    job = load_job(_job(write_job, tiny_flux, "flux", seeds=(3,)), registry)
    fields = a1111_fields(job.plan.item_at(0), "abc", "0.1", job.plugins)
    assert fields["CFG scale"] == "1" and fields["Distilled CFG Scale"] == "3.5"
    plain = load_job(write_job("prompt: x\nguidance: 5\n", "plain.yaml"), registry)  # sdbatch-tiny: real CFG
    fields = a1111_fields(plain.plan.item_at(0), "abc", "0.1", plain.plugins)
    assert fields["CFG scale"] == "5" and "Distilled CFG Scale" not in fields


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_batch_s_prompts_go_through_the_encoders_together_and_keep_their_pixels(family, write_job, registry,
                                                                                  monkeypatch, request):
    # The GPU path on the CPU: prompts are encoded in one call per batch, in calls of exactly 4 chunks;
    # each item's pixels are those it gets rendered alone, and cached prompts are not encoded again.
    # SD 1.x on the shipped sdbatch-tiny, SDXL on its tiny random model.
    from sdbatch_plugins import prompts

    folder = "sdbatch-tiny" if family == "sd1" else request.getfixturevalue(f"tiny_{family}")
    monkeypatch.setattr(prompts, "rows_per_call", lambda device: 4)
    encode, calls = prompts.clip_encoder, []

    def counted(*args, **kwargs):
        encoder = encode(*args, **kwargs)
        return lambda ids: (calls.append(tuple(ids.shape)), encoder(ids))[1]

    monkeypatch.setattr(prompts, "clip_encoder", counted)
    long_prompt = "a red circle" + ", on a blue background" * 20  # two chunks
    job = load_job(write_job(f"""
        model: {folder}
        negative_prompt: "blurry"
        sampler: Euler
        steps: 2
        width: 64
        height: 64
        seed: 3
        sweep:
          prompt: ["a red circle on blue background", "(a green:1.3) square", "{long_prompt}", "a [yellow] triangle"]
    """, f"{family}-prompts.yaml"), registry)
    items = list(job.plan)
    together = [np.asarray(r.image) for r in Renderer(registry, "cpu", "float32", job.plan.models).render(items)]
    encoders = 1 if family == "sd1" else 2
    assert set(calls) == {(4, 77)}
    assert len(calls) <= 3 * encoders, calls  # 6 chunks in two calls per encoder, "" padding the long prompt's negative
    for item, pixels in zip(items, together):
        calls.clear()
        renderer = Renderer(registry, "cpu", "float32", job.plan.models)  # a fresh prompt cache
        assert np.array_equal(np.asarray(renderer.render([item])[0].image), pixels)
        calls.clear()
        renderer.render([item])
        assert calls == []  # the model's cache answered
