"""A1111 prompt syntax: parsing against A1111's table, chunked weighted encoding on sdbatch-tiny,
textual-inversion embeddings, LoRA references and their Civitai hashes."""

from __future__ import annotations

import pytest

from sdbatch_plugins.prompts import (
    BREAK, ChunkSpec, NetworkRef, PromptSyntaxError, chunk_tokens, extract_networks, loras_in,
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
    with pytest.raises(PromptSyntaxError, match="strong"):
        _ = NetworkRef("lora", "x", ("strong",)).weight


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
