"""LoRAs and textual-inversion embeddings: job keys, sweeps, validation, and their effect on sdbatch-tiny."""

from __future__ import annotations

import numpy as np
import pytest

from sdbatch.errors import JobError
from sdbatch.job import load_job
from sdbatch.render import Renderer
from sdbatch.tiny import lora_path

PROMPT = "a large red circle in the centre, on a white background"


@pytest.fixture
def lora_dir(tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    (folder / "tint.safetensors").write_bytes(lora_path().read_bytes())
    return folder


def _job(write_job, registry, lora_dir, body: str):
    return load_job(write_job(f"""
        prompt: "{PROMPT}"
        seed: 5
        steps: 10
        lora_dir: {lora_dir}
        {body}
    """), registry)


def _render(job, registry, items=None):
    renderer = Renderer(registry, "cpu", "float32", job.plan.models)
    return [np.asarray(renderer.render([item])[0].image).astype(int) for item in (items or list(job.plan))]


def _green(image) -> float:
    """How far green leads blue, over the whole picture (the tint LoRA's scenes lead by about 56 on white)."""
    pixels = image.reshape(-1, 3).astype(float)
    return float((pixels[:, 1] - pixels[:, 2]).mean())


# ---------------------------------------------------------------- planning and validation (no model)
def test_weight_and_lora_set_are_sweep_axes_in_ids_and_batch_keys(write_job, registry, lora_dir):
    job = _job(write_job, registry, lora_dir, """
        loras: [{name: tint, weight: 0.5}]
        sweep:
          loras[0].weight: [0, 1.0]
          lora: [none, tint]
        outputs:
          - png
          - xyz_grid: {x: "loras[0].weight", y: lora}
    """)
    items = list(job.plan)
    assert [i.axes for i in items] == [{"loras[0].weight": w, "lora": s} for w in (0, 1.0) for s in ("none", "tint")]
    lora_uses = [item.conditioners[0] for item in items]
    assert all(use.name == "lora" for use in lora_uses)  # before text: it changes the model text encodes with
    assert [u.options["loras"][0]["weight"] for u in lora_uses] == [0, 0, 1.0, 1.0]
    assert [u.options["set"] for u in lora_uses] == ["none", "tint", "none", "tint"]
    assert len({i.id for i in items}) == 4 and len({i.batch_key() for i in items}) == 4


def test_a_missing_lora_is_reported_at_its_line_with_a_close_match(write_job, registry, lora_dir):
    with pytest.raises(JobError) as error:
        load_job(write_job(f"""
            prompt: "a circle <lora:tnt:0.5>"
            lora_dir: {lora_dir}
            loras:
              - name: tinted
            sweep:
              lora: [none, tin]
        """), registry)
    text = str(error.value)
    assert "job.yaml:1:" in text and "unknown LoRA 'tnt'" in text and "did you mean 'tint'" in text
    assert "job.yaml:4:" in text and "loras[0].name" in text and "unknown LoRA 'tinted'" in text
    assert "job.yaml:6:" in text and "unknown LoRA 'tin'" in text


# ---------------------------------------------------------------- the shipped tint LoRA on sdbatch-tiny
@pytest.mark.slow
def test_effect_rises_with_weight_and_weight_zero_is_no_lora(write_job, registry, lora_dir):
    job = _job(write_job, registry, lora_dir, """
        loras: [{name: tint, weight: 1.0}]
        sweep:
          loras[0].weight: [1.0, 0.0, 0.5]
    """)
    full, zero, half = _render(job, registry)  # weight 0 after weight 1: the adapter is switched off, not scaled
    plain = load_job(write_job(f'prompt: "{PROMPT}"\nseed: 5\nsteps: 10\n', "plain.yaml"), registry)
    (base,) = _render(plain, registry)
    assert np.array_equal(zero, base)
    assert _green(base) < _green(half) < _green(full) and _green(full) > _green(base) + 8, (_green(base), _green(half), _green(full))


@pytest.mark.slow
def test_past_the_adapter_limit_the_least_recently_used_lora_unloads_and_reloads_the_same(
        write_job, registry, lora_dir, monkeypatch):
    """PEFT's load slows with every adapter held, so at most MAX_ADAPTERS stay loaded; a LoRA that was
    unloaded loads again when a batch needs it, with the same pixels."""
    from safetensors.torch import load_file, save_file

    import sdbatch_plugins.loras as loras

    tensors = load_file(str(lora_dir / "tint.safetensors"))
    for index in (1, 2):  # other LoRAs: the tint at other strengths
        save_file({k: v * (1 - index / 4) for k, v in tensors.items()}, str(lora_dir / f"tint{index}.safetensors"))
    monkeypatch.setattr(loras, "MAX_ADAPTERS", 2)
    job = _job(write_job, registry, lora_dir, "sweep:\n          lora: [tint, tint1, tint2, tint]")
    renderer = Renderer(registry, "cpu", "float32", job.plan.models)
    items = list(job.plan)
    images = [np.asarray(renderer.render([item])[0].image) for item in items]
    model = renderer.model_for(items[0])
    assert len(model.extra["lora_adapters"]) == 2 and model.extra["lora_loads"] == 4  # tint loaded twice
    assert np.array_equal(images[0], images[3])
    assert len({image.tobytes() for image in images[:3]}) == 3


@pytest.mark.slow
def test_kohya_file_and_prompt_tag_give_the_same_pixels(write_job, registry, lora_dir):
    from diffusers.utils.state_dict_utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    kohya = convert_state_dict_to_kohya(convert_all_state_dict_to_peft(load_file(str(lora_path()))))
    assert all(key.startswith("lora_unet_") for key in kohya)
    save_file(kohya, str(lora_dir / "tint_kohya.safetensors"))
    job = _job(write_job, registry, lora_dir, f"""
        sweep:
          prompt: ["{PROMPT} <lora:tint:0.8>", "{PROMPT} <lora:tint_kohya:0.8>", "{PROMPT}"]
    """)
    items = list(job.plan)
    diffusers_file, kohya_file, plain = _render(job, registry)
    assert np.array_equal(diffusers_file, kohya_file)
    assert not np.array_equal(diffusers_file, plain)
    # one batch holding all three LoRA sets renders each row as it would alone
    together = Renderer(registry, "cpu", "float32", job.plan.models).render(items)
    for row, alone in zip(together, (diffusers_file, kohya_file, plain)):
        assert np.array_equal(np.asarray(row.image).astype(int), alone)


@pytest.mark.slow
def test_lora_hashes_in_the_png_parameters(write_job, registry, lora_dir, tmp_path):
    from sdbatch.metadata import read_image_metadata
    from sdbatch.run import LocalExecutor

    job = load_job(write_job(f"""
        prompt: "{PROMPT} <lora:tint:0.7>"
        steps: 3
        lora_dir: {lora_dir}
    """), registry)
    assert LocalExecutor(job, registry, tmp_path / "out", quiet=True).run().rendered == 1
    (png,) = (tmp_path / "out").rglob("*.png")
    from sdbatch_plugins.networks import lora_hash

    parsed = read_image_metadata(png)["parsed"]
    assert parsed["Lora hashes"] == f"tint: {lora_hash(lora_path())}"
    assert parsed["prompt"].endswith("<lora:tint:0.7>")  # the prompt as written, tag kept (as A1111)


# ---------------------------------------------------------------- textual-inversion embeddings
@pytest.fixture
def embeddings(tmp_path):
    """An A1111-style embedding 'BigBlue' made offline from the words 'large blue' of sdbatch-tiny."""
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTokenizer

    from sdbatch.tiny import model_path

    tokenizer = CLIPTokenizer.from_pretrained(model_path() / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(model_path() / "text_encoder")
    ids = tokenizer("large blue", add_special_tokens=False).input_ids
    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"emb_params": encoder.get_input_embeddings().weight.detach()[ids].clone()},
              str(folder / "BigBlue.safetensors"))
    return folder


@pytest.mark.slow
def test_an_embedding_renders_its_words_and_records_its_hash(write_job, registry, embeddings, tmp_path):
    from sdbatch.metadata import read_image_metadata
    from sdbatch.run import LocalExecutor
    from sdbatch_plugins.networks import embedding_hash

    job = load_job(write_job(f"""
        seed: 2
        embeddings: {embeddings}
        sweep:
          prompt: ["a bigblue square on the left", "a large blue square on the left", "a square on the left"]
    """), registry)
    renderer = Renderer(registry, "cpu", "float32", job.plan.models)
    named, words, plain = (np.asarray(renderer.render([item])[0].image).astype(int) for item in job.plan)
    assert np.array_equal(named, words)  # the token's vectors are those words' vectors
    assert not np.array_equal(named, plain)
    (model,) = renderer.cache._models.values()
    assert {"embedding": "BigBlue", "hash": embedding_hash(embeddings / "BigBlue.safetensors")} in model.extra["modifiers"]

    assert LocalExecutor(job, registry, tmp_path / "out", quiet=True, limit=1).run().rendered == 1
    (png,) = (tmp_path / "out").rglob("*.png")
    parsed = read_image_metadata(png)["parsed"]
    assert parsed["TI hashes"] == f"BigBlue: {embedding_hash(embeddings / 'BigBlue.safetensors')}"


@pytest.mark.slow
def test_the_trained_embedding_draws_its_concept(write_job, registry):
    """sdbatch-tiny's shipped embedding ``tinysun`` (trained by ``sdbatch.tiny.train_embedding`` on pictures
    of a large yellow circle at the top on black, never named in its captions) draws that concept; the
    same prompt without the embedding does not."""
    from sdbatch.tiny import classifier, embeddings_path
    from sdbatch.tiny.train_embedding import CONCEPT

    model = classifier.load()

    def concept_share(extra: str) -> float:
        job = load_job(write_job(f"""
            prompt: "a picture of tinysun"
            steps: 12
            sweep: {{seed: {{start: 1, count: 8}}}}
            {extra}
        """), registry)
        renderer = Renderer(registry, "cpu", "float32", job.plan.models)
        images = np.stack([np.asarray(r.image) for r in renderer.render(list(job.plan))])
        found = classifier.predict(model, images)
        hits = [all(found[key][i] == value for key, value in CONCEPT.items() if key in found)
                for i in range(len(images))]
        return sum(hits) / len(hits)

    with_embedding = concept_share(f"embeddings: {embeddings_path()}")
    without = concept_share("")
    print(f"concept drawn: {with_embedding:.0%} with the embedding, {without:.0%} without")
    assert with_embedding >= 0.6 and without <= 0.2


@pytest.mark.slow
def test_sdxl_lora_with_text_encoder_layers(write_job, registry, tiny_sdxl, tmp_path):
    """An SDXL LoRA on the U-Net and both text encoders, through the SDXL pipeline's own loader."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    torch.manual_seed(0)
    layers = {}
    for name in ("unet", "text_encoder", "text_encoder_2"):
        component = getattr(pipe, name)
        inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian",
                                           target_modules=["to_q", "to_v", "q_proj", "v_proj"]), component)
        state = get_peft_model_state_dict(component)
        layers[name] = {k: torch.randn_like(v) * 0.5 for k, v in state.items()}  # PEFT keys
    folder = tmp_path / "loras"
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=layers["unet"],
                                                text_encoder_lora_layers=layers["text_encoder"],
                                                text_encoder_2_lora_layers=layers["text_encoder_2"],
                                                weight_name="xl.safetensors")
    job = load_job(write_job(f"""
        model: {tiny_sdxl}
        prompt: "a red circle"
        steps: 3
        lora_dir: {folder}
        sweep:
          prompt: ["a red circle <lora:xl:1>", "a red circle <lora:xl:0>", "a red circle <lora:xl:1:0>", "a red circle"]
    """), registry)
    full, zero, text_only, plain = _render(job, registry)
    assert np.array_equal(zero, plain)
    assert not np.array_equal(full, plain) and not np.array_equal(text_only, plain)
    assert not np.array_equal(full, text_only)  # the U-Net weight 0 leaves only the text encoders' layers
    # same prompt text, LoRA switched off after it was on: the cached text conditioning must not be reused
    swept = load_job(write_job(f"""
        model: {tiny_sdxl}
        prompt: "a red circle"
        steps: 3
        loras: [{{path: {folder / 'xl.safetensors'}, weight: 1.0}}]
        sweep:
          loras[0].weight: [1.0, 0.0]
    """, "swept.yaml"), registry)
    on, off = _render(swept, registry)
    assert np.array_equal(off, plain) and np.array_equal(on, full)


def test_pickled_loras_need_allow_pickle(write_job, registry, lora_dir):
    (lora_dir / "old.pt").write_bytes(b"not read at validation")
    with pytest.raises(JobError) as error:
        _job(write_job, registry, lora_dir, "sweep:\n          lora: [old]")
    assert "allow_pickle" in str(error.value) and "sweep.lora[0]" in str(error.value)
