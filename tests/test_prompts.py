"""A1111 prompt syntax: parsing against A1111's table, chunked weighted encoding on sdbatch-tiny,
textual-inversion embeddings, LoRA references and their Civitai hashes."""

from __future__ import annotations

import pytest

from sdbatch_plugins.prompts import (
    BREAK, ChunkSpec, NetworkRef, PromptSyntaxError, chunk_tokens, embedding_token, extract_networks, loras_in,
    parse_prompt_attention,
)

# A1111's own doctest table (modules/prompt_parser.py), then cases worked through its algorithm
# by hand: weights multiply in the order brackets close, so the expected floats are written as
# the same products.
A1111_TABLE = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]
TRICKY = [
    ("", [("", 1.0)]),
    ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("a BREAKfast, break", [("a BREAKfast, break", 1.0)]),
    ("(a:1.5) [b] \\(c\\)", [("a", 1.5), (" ", 1.0), ("b", 1 / 1.1), (" (c)", 1.0)]),
    ("((a) b:1.5)", [("a", 1.0 * 1.1 * 1.5), (" b", 1.5)]),
    ("[unbalanced", [("unbalanced", 1 / 1.1)]),
    ("(a [b] c", [("a ", 1.1), ("b", 1.0 * (1 / 1.1) * 1.1), (" c", 1.1)]),
    ("a) b] c:", [("a) b] c:", 1.0)]),
    ("(word:1.3", [("word:1.3", 1.1)]),
    ("x :1.3) y", [("x :1.3) y", 1.0)]),
    ("a \\\\ b \\ c", [("a \\ b  c", 1.0)]),
    # a negative prompt as people write them, weights below 1 and below 0 included
    ("(blurry:1.4), [lowres], (worst quality:-0.5)",
     [("blurry", 1.4), (", ", 1.0), ("lowres", 1 / 1.1), (", ", 1.0), ("worst quality", -0.5)]),
    # sdbatch keeps a BREAK inside brackets a break (A1111 weights its marker and encodes "BREAK")
    ("(a BREAK b)", [("a", 1.1), BREAK, ("b", 1.1)]),
]


@pytest.mark.parametrize("prompt, expected", A1111_TABLE + TRICKY)
def test_parse_matches_a1111(prompt, expected):
    assert parse_prompt_attention(prompt) == expected


def test_a_weight_a1111_cannot_read_is_an_error():
    with pytest.raises(PromptSyntaxError, match="1.2.3"):
        parse_prompt_attention("a (fox:1.2.3)")


def test_networks_leave_the_text_and_keep_their_arguments():
    text, refs = extract_networks("a (red:1.3) fox <lora:water colour:0.8>, <hypernet:ink>"
                                  "<lora:sharp:0.5:unet=0.2> BREAK hills")
    assert text == "a (red:1.3) fox ,  BREAK hills"
    assert refs == [NetworkRef("lora", "water colour", ("0.8",)), NetworkRef("hypernet", "ink"),
                    NetworkRef("lora", "sharp", ("0.5", "unet=0.2"))]
    assert [(r.weight, r.unet_weight) for r in refs] == [(0.8, 0.8), (1.0, 1.0), (0.5, 0.2)]
    assert [r.name for r in loras_in("<lora:a> <lyco:b:1> <hypernet:c>")] == ["a", "b"]
    assert str(refs[2]) == "<lora:sharp:0.5:unet=0.2>"
    assert extract_networks(embedding_token("easy"))[1] == []  # an added embedding token is no tag
    with pytest.raises(PromptSyntaxError, match="strong"):
        _ = NetworkRef("lora", "x", ("strong",)).weight


def test_dynamicprompts_expansion_keeps_a1111_syntax():
    from sdbatch.plan import expand_prompts

    template = "a {red|blue} (fox:1.3), [blurry] <lora:ink:0.8> BREAK \\(x\\)"
    prompts = [prompt for _, prompt in expand_prompts([template], None)]
    assert prompts == ["a red (fox:1.3), [blurry] <lora:ink:0.8> BREAK \\(x\\)",
                       "a blue (fox:1.3), [blurry] <lora:ink:0.8> BREAK \\(x\\)"]
    text, refs = extract_networks(prompts[1])
    assert refs == [NetworkRef("lora", "ink", ("0.8",))]
    assert parse_prompt_attention(text) == [("a blue ", 1.0), ("fox", 1.3), (", ", 1.0), ("blurry", 1 / 1.1),
                                            ("", 1.0), BREAK, ("(x)", 1.0)]  # BREAK eats the spaces


SPEC = ChunkSpec(bos=1, eos=2, pad=2, comma=9, vectors={7: 3})


def _chunk(fragments, ids, spec=SPEC):
    return [(chunk.tokens, chunk.weights) for chunk in chunk_tokens(fragments, ids, spec)]


def test_chunks_wrap_75_tokens_and_move_back_to_a_comma():
    # 70 words, a comma, then 10 more words: the chunk fills at 75 with the comma 5 tokens back,
    # so the 4 words after the comma move to the second chunk.
    ids = [[5] * 70 + [9] + [6] * 10]
    (first, w1), (second, w2) = _chunk([("text", 1.2)], ids)
    assert first == [1] + [5] * 70 + [9] + [2] * 4 + [2] and len(first) == 77
    assert second == [1] + [6] * 10 + [2] * 65 + [2]
    assert w1[:72] == [1.0] + [1.2] * 71 and w1[72:] == [1.0] * 5 and w2[1:11] == [1.2] * 10
    # no comma within 20 tokens: a hard cut at 75
    (first, _), (second, _) = _chunk([("text", 1.0)], [[9] + [5] * 80])
    assert first[1:76] == [9] + [5] * 74 and second[1:7] == [5] * 6


def test_break_starts_a_chunk_and_an_embedding_is_never_split():
    chunks = _chunk([("a", 1.0), BREAK, ("b", 1.0)], [[5, 5], [], [6]])
    assert [c[0][:4] for c in chunks] == [[1, 5, 5, 2], [1, 6, 2, 2]]
    # a 3-vector embedding (first id 7) that would straddle the boundary starts the next chunk
    (first, _), (second, _) = _chunk([("x", 1.0)], [[5] * 73 + [7, 8, 8] + [6]])
    assert first[74:] == [2, 2, 2] and second[1:5] == [7, 8, 8, 6]
    # a tokenizer whose pad differs from EOS (SDXL's CLIP-G) pads after the first EOS
    (only, _), = _chunk([("a", 1.0)], [[5]], ChunkSpec(bos=1, eos=2, pad=0, comma=None, vectors={}))
    assert only[:4] == [1, 5, 2, 0] and set(only[3:]) == {0}


# ---------------------------------------------------------------------------------------------
# Encoding on sdbatch-tiny (the shipped model)

PLAIN = "a large red circle on the left, on a white background"
FILLER = "a large circle in the centre" + ", on a white background" * 28  # 146 tokens before the last word


@pytest.fixture(scope="module")
def tiny_pipe():
    import torch
    from diffusers import StableDiffusionPipeline

    from sdbatch.tiny import model_path

    torch.set_num_threads(1)
    pipe = StableDiffusionPipeline.from_pretrained(model_path(), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _render(pipe, prompts, seeds, steps=10):
    """Render each prompt with each seed through diffusers' pipeline, from our prompt embeddings."""
    import torch

    from sdbatch_plugins.prompts import clip_encoder, encode_prompts

    texts = [p for p in prompts for _ in seeds]
    hidden, _ = encode_prompts(pipe.tokenizer, clip_encoder(pipe.text_encoder), texts + [""] * len(texts))
    generators = [torch.Generator().manual_seed(s) for _ in prompts for s in seeds]
    return pipe(prompt_embeds=hidden[:len(texts)], negative_prompt_embeds=hidden[len(texts):], generator=generators,
                num_inference_steps=steps, guidance_scale=5.0, height=64, width=64, output_type="np").images


def _redness(images):
    """Per image: mean of R - max(G, B) over the shape's pixels (those unlike the corners)."""
    import numpy as np

    values = []
    for image in images:
        background = np.median(image[[0, 0, -1, -1], [0, -1, 0, -1]], axis=0)
        pixels = image.reshape(-1, 3)
        shape = pixels[np.abs(pixels - background).sum(1) > 0.25]
        values.append(float((shape[:, 0] - shape[:, 1:].max(1)).mean()))
    return np.array(values)


def test_a_plain_short_prompt_encodes_exactly_as_before(tiny_pipe):
    import torch

    from sdbatch_plugins.prompts import clip_encoder, encode_prompt_chunks

    pipe = tiny_pipe
    for prompt in (PLAIN, "", "blurry: lowres"):
        hidden, pooled = encode_prompt_chunks(pipe.tokenizer, clip_encoder(pipe.text_encoder), prompt)
        ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        with torch.inference_mode():  # the single 77-token encoding sdbatch used before prompt syntax
            before = pipe.text_encoder(ids.input_ids)[0][0]
        assert torch.equal(hidden, before)
        assert pooled.shape == (pipe.text_encoder.config.hidden_size,)
    # Clip skip 2: the layer before the last, through the final norm (diffusers' clip_skip=1, whose
    # own code path reads text_model, which transformers 5 no longer has).
    skipped, _ = encode_prompt_chunks(pipe.tokenizer, clip_encoder(pipe.text_encoder, 2), PLAIN)
    ids = pipe.tokenizer(PLAIN, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.inference_mode():
        states = pipe.text_encoder(ids, output_hidden_states=True).hidden_states
        assert torch.equal(skipped, pipe.text_encoder.final_layer_norm(states[-2])[0])
    assert not torch.equal(skipped, hidden)


def test_weights_scale_tokens_and_keep_the_mean(tiny_pipe):
    import torch

    from sdbatch_plugins.prompts import clip_encoder, encode_prompt_chunks

    encode = clip_encoder(tiny_pipe.text_encoder)
    plain, _ = encode_prompt_chunks(tiny_pipe.tokenizer, encode, "a large red circle")
    weighted, _ = encode_prompt_chunks(tiny_pipe.tokenizer, encode, "a large (red:1.5) circle")
    ignored, _ = encode_prompt_chunks(tiny_pipe.tokenizer, encode, "a large (red:1.5) circle", emphasis=False)
    assert torch.equal(ignored, plain)  # the same tokens: brackets and weight are syntax, not text
    ratio = plain.mean() / (plain * torch.tensor([1.5 if i == 3 else 1.0 for i in range(77)])[:, None]).mean()
    expected = plain.clone()
    expected[3] *= 1.5  # BOS, a, large, red: the fourth row
    assert torch.allclose(weighted, expected * ratio, atol=1e-6)
    assert torch.isclose(weighted.mean(), plain.mean(), atol=1e-6)


@pytest.mark.slow
def test_a_weighted_colour_moves_the_picture_further(tiny_pipe):
    # A purple circle that is also "red": the weight decides how far towards red it goes.
    prompts = [f"a large {red}purple circle in the centre, on a white background" for red in ("", "red ", "(red:1.5) ")]
    redness = _redness(_render(tiny_pipe, prompts, seeds=(1, 2, 3))).reshape(3, 3).mean(1)
    purple, red, strong = redness  # measured: -0.30, -0.11, -0.02
    assert red - purple > 0.1 and strong - red > 0.04, redness


@pytest.mark.slow
def test_words_after_77_tokens_change_the_embeddings_and_the_picture(tiny_pipe):
    import torch

    from sdbatch_plugins.prompts import clip_encoder, encode_prompt_chunks

    pipe, red, blue = tiny_pipe, FILLER + ", red", FILLER + ", blue"
    assert len(pipe.tokenizer(red, add_special_tokens=False).input_ids) == 148
    cut = [pipe.tokenizer(p, truncation=True, max_length=77).input_ids for p in (red, blue)]
    assert cut[0] == cut[1]  # truncated at 77 tokens, as before, the colour is lost
    (a, _), (b, _) = (encode_prompt_chunks(pipe.tokenizer, clip_encoder(pipe.text_encoder), p) for p in (red, blue))
    # three chunks: each break moved back to a comma, so 148 tokens need more than two
    assert a.shape == b.shape == (3 * 77, pipe.text_encoder.config.hidden_size)
    assert torch.equal(a[:154], b[:154]) and not torch.allclose(a[154:], b[154:])
    redness = _redness(_render(pipe, [red, blue], seeds=(1, 2, 3))).reshape(2, 3).mean(1)
    assert redness[0] - redness[1] > 0.08, redness  # measured 0.18 against 0.02; the colour is token 148


def test_prompt_and_negative_pad_to_the_same_chunks_with_the_empty_prompt(tiny_pipe):
    import torch

    from sdbatch_plugins.prompts import clip_encoder, encode_prompt_chunks, encode_prompts

    encode = clip_encoder(tiny_pipe.text_encoder)
    hidden, pooled = encode_prompts(tiny_pipe.tokenizer, encode, [FILLER, "(blurry:1.3) BREAK lowres", "blurry"])
    assert hidden.shape[:2] == (3, 154) and pooled.shape[0] == 3
    empty, _ = encode_prompt_chunks(tiny_pipe.tokenizer, encode, "")
    alone, _ = encode_prompt_chunks(tiny_pipe.tokenizer, encode, "blurry")
    assert torch.equal(hidden[2, :77], alone) and torch.equal(hidden[2, 77:], empty)
    two, _ = encode_prompt_chunks(tiny_pipe.tokenizer, encode, "(blurry:1.3) BREAK lowres")
    assert torch.equal(hidden[1], two)  # BREAK made two chunks of its own


def test_an_sdxl_style_encoder_matches_diffusers_plain_encoding():
    # SDXL's second encoder: a tokenizer padding with "!" after EOS, the penultimate layer without
    # the final norm, and the projected pooled output; built at sdbatch-tiny's size, untrained.
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from sdbatch.tiny import model_path
    from sdbatch_plugins.prompts import clip_encoder, encode_prompt_chunks, prompt_chunks

    tokenizer = CLIPTokenizer.from_pretrained(model_path() / "tokenizer", pad_token="!")
    torch.manual_seed(0)
    encoder = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(model_path() / "text_encoder")).eval()
    ids = tokenizer(PLAIN, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert prompt_chunks(tokenizer, PLAIN)[0].tokens == ids[0].tolist()  # what diffusers' SDXL pipeline feeds
    hidden, pooled = encode_prompt_chunks(tokenizer, clip_encoder(encoder, penultimate=True), PLAIN)
    with torch.inference_mode():
        output = encoder(ids, output_hidden_states=True)
    assert torch.equal(hidden, output.hidden_states[-2][0]) and torch.equal(pooled, output.text_embeds[0])
    skipped, _ = encode_prompt_chunks(tokenizer, clip_encoder(encoder, 2, penultimate=True), PLAIN)
    assert torch.equal(skipped, output.hidden_states[-3][0])
    chunks = prompt_chunks(tokenizer, FILLER)
    long, first = encode_prompt_chunks(tokenizer, clip_encoder(encoder, penultimate=True), FILLER)
    assert len(chunks) == 2 and long.shape[0] == 2 * 77
    with torch.inference_mode():  # pooled: the first chunk's, as A1111 and SDXL take it
        assert torch.allclose(first, encoder(torch.tensor([chunks[0].tokens])).text_embeds[0], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Textual-inversion embeddings


@pytest.fixture
def tiny_clip():
    """A fresh sdbatch-tiny tokenizer and text encoder (embeddings change them)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from sdbatch.tiny import model_path

    return (CLIPTokenizer.from_pretrained(model_path() / "tokenizer"),
            CLIPTextModel.from_pretrained(model_path() / "text_encoder").eval())


def _vectors(tokenizer, text_encoder, words):
    """The input-embedding rows of some words: an embedding that means exactly those words."""
    ids = tokenizer(words, add_special_tokens=False).input_ids
    return text_encoder.get_input_embeddings().weight.detach()[ids].clone()


def _same_encoding(tokenizer, text_encoder, prompt, reference):
    import torch

    from sdbatch_plugins.prompts import clip_encoder, encode_prompt_chunks

    encode = clip_encoder(text_encoder)
    return torch.equal(encode_prompt_chunks(tokenizer, encode, prompt)[0],
                       encode_prompt_chunks(tokenizer, encode, reference)[0])


def test_embeddings_in_a1111_and_diffusers_files_mean_their_vectors(tiny_clip, tmp_path):
    import torch
    from safetensors.torch import save_file

    from sdbatch_plugins.networks import (
        NetworkError, add_embedding, embeddings_for, embeddings_in, find_embedding, read_embedding,
    )

    tokenizer, text_encoder = tiny_clip
    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"emb_params": _vectors(tokenizer, text_encoder, "large red")}, folder / "BigRed.safetensors")  # A1111
    save_file({"<bluish>": _vectors(tokenizer, text_encoder, "blue")[0]}, folder / "bluish.safetensors")  # diffusers
    torch.save({"string_to_param": {"*": _vectors(tokenizer, text_encoder, "green")}, "name": "verde", "step": 9},
               folder / "verde.pt")  # A1111's own pickle
    with pytest.raises(NetworkError, match="allow_pickle"):
        read_embedding(folder / "verde.pt")
    embeddings = [read_embedding(folder / "BigRed.safetensors"), read_embedding(folder / "bluish.safetensors"),
                  read_embedding(folder / "verde.pt", allow_pickle=True)]
    assert [e.vectors[""].shape[0] for e in embeddings] == [2, 1, 1]
    before = _same_encoding(tokenizer, text_encoder, "a bigred circle", "a large red circle")
    for embedding in embeddings:
        assert add_embedding(tokenizer, text_encoder, embedding)
    assert not add_embedding(tokenizer, text_encoder, embeddings[0])  # known already: unchanged
    assert not before  # without the embedding "bigred" is letters
    assert _same_encoding(tokenizer, text_encoder, "a bigred circle", "a large red circle")  # two vectors
    assert _same_encoding(tokenizer, text_encoder, "a (Bluish:1.3), verde", "a (blue:1.3), green")
    assert not _same_encoding(tokenizer, text_encoder, "a bigreds circle", "a large reds circle")  # not the word
    prompt = "a BIGRED circle <lora:verde:1>, bluish, bigred, notverde"
    assert embeddings_in(prompt, ["verde", "bluish", "BigRed"]) == ["BigRed", "bluish"]
    assert embeddings_for([prompt, "(verde:0.5)"], folder) == {"BigRed": folder / "BigRed.safetensors",
                                                               "bluish": folder / "bluish.safetensors"}
    assert embeddings_for(["verde"], folder, allow_pickle=True) == {"verde": folder / "verde.pt"}
    with pytest.raises(NetworkError, match=r"unknown embedding 'bluesh' in .* \(did you mean 'bluish'\?\)"):
        find_embedding("bluesh", folder)
    with pytest.raises(NetworkError, match="does not exist"):
        find_embedding("bluish", tmp_path / "nowhere")


def test_sdxl_embeddings_give_each_encoder_its_own_vectors(tiny_clip, tmp_path):
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    from sdbatch.tiny import model_path
    from sdbatch_plugins.networks import NetworkError, add_embedding, read_embedding

    tokenizer, text_encoder = tiny_clip
    second = (type(tokenizer).from_pretrained(model_path() / "tokenizer"),
              CLIPTextModel.from_pretrained(model_path() / "text_encoder").eval())
    path = tmp_path / "hue.safetensors"
    save_file({"clip_l": _vectors(tokenizer, text_encoder, "red"), "clip_g": _vectors(tokenizer, text_encoder, "blue")},
              path)
    embedding = read_embedding(path)
    assert embedding.sdxl
    with pytest.raises(NetworkError, match="SDXL"):
        add_embedding(tokenizer, text_encoder, embedding)  # an SD 1.x encoder has no part to take
    add_embedding(tokenizer, text_encoder, embedding, "clip_l")
    add_embedding(*second, embedding, "clip_g")
    assert _same_encoding(tokenizer, text_encoder, "a hue circle", "a red circle")
    assert _same_encoding(*second, "a hue circle", "a blue circle")
    wide = tmp_path / "wide.safetensors"
    save_file({"emb_params": embedding.vectors["clip_l"].repeat(1, 2)}, wide)
    with pytest.raises(NetworkError, match="128-wide vectors; this text encoder takes 64"):
        add_embedding(*second, read_embedding(wide))


# ---------------------------------------------------------------------------------------------
# LoRA names and Civitai's hashes


def _save(path, metadata=None, value=1.0):
    import numpy as np
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.full((4, 3), value, dtype=np.float32)
    save_file({"lora_unet_down.lora_up.weight": data}, str(path), metadata=metadata)
    return data


def test_lora_names_resolve_by_stem_with_close_matches_and_no_pickles(tmp_path):
    from sdbatch_plugins.networks import NetworkError, find_lora, prompt_problems

    loras = tmp_path / "loras"
    _save(loras / "watercolor.safetensors")
    _save(loras / "styles" / "ink.safetensors")
    (loras / "old.pt").write_bytes(b"not read")
    assert find_lora("ink", loras) == loras / "styles" / "ink.safetensors"
    with pytest.raises(NetworkError, match=r"unknown LoRA 'watercolr' in .*loras \(did you mean 'watercolor'\?\)"):
        find_lora("watercolr", loras)
    with pytest.raises(NetworkError, match="pickle .*allow_pickle: true"):
        find_lora("old", loras)
    assert find_lora("old", loras, allow_pickle=True) == loras / "old.pt"
    _save(loras / "more" / "ink.safetensors")
    with pytest.raises(NetworkError, match="ambiguous"):
        find_lora("ink", loras)
    problems = prompt_problems("a fox <lora:watercolor:0.8> <lora:inc:1> <hypernet:x>", loras)
    assert problems == [f"unknown LoRA 'inc' in {loras} (did you mean 'ink'?)"]
    assert prompt_problems("a fox <lora:ink>", None) == ["'<lora:ink>' needs lora_dir: the folder where LoRA names resolve"]


def test_civitai_hashes_are_a1111s(tmp_path):
    import hashlib

    from sdbatch.metadata import format_parameters, parse_parameters
    from sdbatch_plugins.networks import civitai_fields, embedding_hash, lora_hash

    plain, described = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    data = _save(plain)
    _save(described, metadata={"ss_output_name": "b", "ss_network_dim": "4"})
    # LoRAs: sha256 of the tensor bytes after the header, so metadata does not change it
    assert lora_hash(plain) == lora_hash(described) == hashlib.sha256(data.tobytes()).hexdigest()[:12]
    # embeddings: sha256 of the whole file
    assert embedding_hash(plain) == hashlib.sha256(plain.read_bytes()).hexdigest()[:12] != embedding_hash(described)
    kohya = tmp_path / "kohya.safetensors"
    _save(kohya, metadata={"sshs_model_hash": "0123456789abcdef" * 4})
    assert lora_hash(kohya) == "0123456789ab"  # what kohya recorded wins, as in A1111

    fields = civitai_fields({"water:colour": plain, "ink, v2": kohya}, {"bluish": described})
    assert fields == {"Lora hashes": f"watercolour: {lora_hash(plain)}, ink v2: 0123456789ab",
                      "TI hashes": f"bluish: {embedding_hash(described)}"}
    text = format_parameters("a fox <lora:water:colour:1>", "", {"Steps": 20, **fields})
    assert text.endswith(f'Lora hashes: "watercolour: {lora_hash(plain)}, ink v2: 0123456789ab", '
                         f'TI hashes: "bluish: {embedding_hash(described)}"')
    assert parse_parameters(text)["Lora hashes"] == fields["Lora hashes"]
    assert civitai_fields({}, {}) == {}


def test_the_prompt_modules_import_no_torch():
    import subprocess
    import sys

    code = ("import sys, sdbatch_plugins.prompts, sdbatch_plugins.networks; "
            "assert not {'torch', 'diffusers', 'transformers'} & set(sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_prompts_encoded_together_in_fixed_shape_calls_get_their_own_states(tiny_pipe):
    # The GPU path (rows_per_call): every call has exactly `group` chunks, the last padded, so a
    # prompt's states are the same whichever prompts share its calls, and a batch costs few calls.
    import torch

    from sdbatch_plugins.prompts import clip_encoder, encode_many, encode_prompt_chunks

    encode = clip_encoder(tiny_pipe.text_encoder)
    shapes = []

    def counted(ids):
        shapes.append(tuple(ids.shape))
        return encode(ids)

    prompts = [FILLER, "(blurry:1.3) BREAK lowres", "a [yellow] triangle", "blurry"]  # 3 + 2 + 1 + 1 chunks
    together = encode_many(tiny_pipe.tokenizer, counted, prompts, group=4)
    assert shapes == [(4, 77), (4, 77)]  # 7 chunks in two calls
    for index, prompt in enumerate(prompts):
        others = encode_many(tiny_pipe.tokenizer, encode, [prompts[-1 - index], prompt, "red"], group=4)[1]
        alone = encode_prompt_chunks(tiny_pipe.tokenizer, encode, prompt, group=4)
        assert torch.equal(together[index][0], alone[0]) and torch.equal(others[0], alone[0])
        # and the same states as one call per prompt (the CPU path), to the last bits of float32
        assert torch.allclose(alone[0], encode_prompt_chunks(tiny_pipe.tokenizer, encode, prompt)[0], atol=1e-5)
