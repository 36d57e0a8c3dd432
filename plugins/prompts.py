"""AUTOMATIC1111's prompt syntax, and long weighted prompts encoded as A1111 encodes them for CLIP.

Parsing (torch-free): ``<lora:name:weight>`` tags are taken out of the text (`extract_networks`),
then ``(word)``, ``(word:1.3)``, ``[word]``, escapes and ``BREAK`` become (text, weight) fragments
with A1111's numbers (`parse_prompt_attention`).

Encoding (`encode_prompt_chunks`, `encode_many`, `encode_prompts`): the fragments' tokens go into chunks of 75
between BOS and EOS (a chunk break moves back to a comma up to 20 tokens earlier; BREAK starts a
new chunk), each chunk goes through the text encoder, the hidden states are scaled by their
token's weight and rescaled to the chunk's original mean (A1111's default "Original" emphasis),
and the chunks are joined along the token axis. The text encoder is any callable from token ids
to hidden states (see `clip_encoder`), so one function serves SD 1.x's encoder and each of
SDXL's two. A prompt with no weights and at most 75 tokens encodes exactly as diffusers' plain
77-token encoding does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from sdbatch.rows import fixed_chunks

CHUNK_TOKENS = 75  # prompt tokens per chunk; BOS and EOS make CLIP's 77
COMMA_BACKTRACK = 20  # A1111's "Prompt word wrap length limit" default
BREAK = ("BREAK", -1.0)  # A1111's marker fragment for a chunk break

# One token of the attention syntax, in A1111's order of preference: escapes, a lone backslash,
# brackets, an explicit weight that closes a round bracket, closers, plain text, a stray colon.
_ATTENTION = re.compile(r"""
    (?P<escaped>\\[()\[\]\\]) | (?P<backslash>\\) | (?P<open>[(\[]) | :(?P<weight>[+-]?[.\d]+)\) |
    (?P<close>[)\]]) | (?P<text>[^\\()\[\]:]+) | (?P<colon>:)
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_NETWORK = re.compile(r"<(\w+):([^>]+)>")  # A1111's extra-network tag: <kind:name[:args...]>


class PromptSyntaxError(ValueError):
    """A prompt A1111 cannot read either (a weight such as ``(word:1.2.3)``)."""


# ---------------------------------------------------------------------------------------------
# Extra networks: <lora:name:weight>, <hypernet:name:weight>


@dataclass(frozen=True)
class NetworkRef:
    """One ``<kind:name:arg...>`` tag from a prompt, as A1111's extra networks read it."""

    kind: str  # lora, hypernet, lyco, ...
    name: str
    args: tuple[str, ...] = ()  # what follows the name, split at ':'

    def _named(self) -> dict[str, str]:
        return dict(arg.split("=", 1) for arg in self.args if "=" in arg)

    def _positional(self) -> list[str]:
        return [arg for arg in self.args if "=" not in arg]

    @property
    def weight(self) -> float:
        """The text-encoder multiplier: ``te=`` or the first number (1.0 when absent)."""
        named, positional = self._named(), self._positional()
        return _number(named.get("te", positional[0] if positional else "1"), self)

    @property
    def unet_weight(self) -> float:
        """The U-Net multiplier: ``unet=`` or the second number, else the text-encoder one (A1111)."""
        named, positional = self._named(), self._positional()
        if "unet" in named or len(positional) > 1:
            return _number(named.get("unet", positional[1] if len(positional) > 1 else "1"), self)
        return self.weight

    def __str__(self) -> str:
        return "<" + ":".join((self.kind, self.name, *self.args)) + ">"


def _number(text: str, ref: NetworkRef) -> float:
    try:
        return float(text)
    except ValueError:
        raise PromptSyntaxError(f"'{ref}': weight '{text}' is not a number") from None


def extract_networks(prompt: str) -> tuple[str, list[NetworkRef]]:
    """The prompt without its ``<kind:name:...>`` tags (what the encoder sees), and the tags in order."""
    found: list[NetworkRef] = []

    def take(match: re.Match) -> str:
        name, *args = match.group(2).split(":")
        found.append(NetworkRef(match.group(1), name, tuple(args)))
        return ""

    return _NETWORK.sub(take, prompt), found


def loras_in(prompt: str) -> list[NetworkRef]:
    """The ``<lora:...>`` tags of a prompt (A1111 also reads ``<lyco:...>`` as a LoRA)."""
    return [ref for ref in extract_networks(prompt)[1] if ref.kind in ("lora", "lyco")]


# ---------------------------------------------------------------------------------------------
# Attention: (word), (word:1.3), [word], escapes, BREAK


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """(text, weight) fragments with A1111's semantics; BREAK is the fragment ``("BREAK", -1.0)``.

    ``(x)`` multiplies by 1.1, ``(x:w)`` by w, ``[x]`` divides by 1.1; nesting multiplies;
    brackets left open at the end still apply; a closer with no opener, and ``:`` outside a
    weight, are text; ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are the literal characters.
    Neighbours of equal weight merge. One deliberate difference: a BREAK inside brackets
    still breaks (A1111 multiplies its marker and then encodes the word "BREAK").
    """
    fragments: list[list] = []  # [text, weight, is_break], weights multiplied in place
    rounds: list[int] = []  # fragment index where each open bracket starts
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            if not fragment[2]:
                fragment[1] *= factor

    for match in _ATTENTION.finditer(text):
        kind, token = match.lastgroup, match.group(0)
        if kind == "escaped":
            fragments.append([token[1], 1.0, False])
        elif kind == "backslash":
            continue  # A1111 keeps the empty rest of a lone backslash: nothing
        elif token == "(":
            rounds.append(len(fragments))
        elif token == "[":
            squares.append(len(fragments))
        elif kind == "weight" and rounds:
            scale(rounds.pop(), _weight(match.group("weight"), text))
        elif token == ")" and rounds:
            scale(rounds.pop(), 1.1)
        elif token == "]" and squares:
            scale(squares.pop(), 1 / 1.1)
        else:
            _append_text(fragments, token)
    for start in rounds:
        scale(start, 1.1)
    for start in squares:
        scale(start, 1 / 1.1)
    return _merge(fragments) if fragments else [("", 1.0)]


def _weight(value: str, text: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise PromptSyntaxError(f"'{value}' is not a weight in prompt {text!r}") from None


def _append_text(fragments: list[list], token: str) -> None:
    for index, part in enumerate(_BREAK.split(token)):
        if index:
            fragments.append([*BREAK, True])
        fragments.append([part, 1.0, False])


def _merge(fragments: list[list]) -> list[tuple[str, float]]:
    """Join neighbours of equal weight, as A1111 does (a BREAK marker joins nothing)."""
    merged = [fragments[0]]
    for fragment in fragments[1:]:
        if fragment[1] == merged[-1][1] and not (fragment[2] or merged[-1][2]):
            merged[-1][0] += fragment[0]
        else:
            merged.append(fragment)
    return [(text, weight) for text, weight, _ in merged]


# ---------------------------------------------------------------------------------------------
# Chunks: 75 tokens between BOS and EOS, A1111's way


@dataclass
class Chunk:
    """77 token ids (BOS, 75 prompt or padding tokens, EOS) and one weight per id."""

    tokens: list[int]
    weights: list[float]


@dataclass(frozen=True)
class ChunkSpec:
    """What chunking needs from a tokenizer: its special ids, and the comma A1111 wraps at."""

    bos: int
    eos: int
    pad: int
    comma: int | None
    vectors: dict  # first token id of each textual-inversion embedding -> its vector count

    @classmethod
    def of(cls, tokenizer) -> "ChunkSpec":
        comma = tokenizer.get_vocab().get(",</w>")
        return cls(tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, comma,
                   embedding_vectors(tokenizer))


def embedding_token(name: str) -> str:
    """The tokenizer token sdbatch adds for textual-inversion embedding ``name`` (never typed by hand)."""
    return f"<ti-{name}>"  # no colon: not an A1111 <kind:name> tag


def embedding_names(tokenizer) -> dict[str, int]:
    """Each textual-inversion embedding added to this tokenizer, with its vector count."""
    added = tokenizer.get_added_vocab()
    names = {}
    for token in added:
        found = re.fullmatch(r"<ti-(.+)>", token)
        if found:
            count = 1
            while f"{token}_{count}" in added:  # diffusers names later vectors token_1, token_2...
                count += 1
            names[found.group(1)] = count
    return names


def embedding_vectors(tokenizer) -> dict[int, int]:
    """The first token id of each added embedding, with its vector count."""
    return {tokenizer.convert_tokens_to_ids(embedding_token(name)): count
            for name, count in embedding_names(tokenizer).items()}


def embedding_words(names: Sequence[str]) -> re.Pattern:
    """A pattern for embedding names used as words, in any case (A1111 matches the name's tokens)."""
    alternatives = "|".join(re.escape(name) for name in sorted(names, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.I)


def use_embeddings(text: str, names: dict[str, int]) -> str:
    """Each embedding name used as a word in ``text`` replaced by its tokens (name, name_1, ...)."""
    if not names:
        return text
    canonical = {name.lower(): name for name in names}

    def tokens(match: re.Match) -> str:
        name = canonical[match.group(0).lower()]
        token = embedding_token(name)
        return " ".join([token] + [f"{token}_{i}" for i in range(1, names[name])])

    return embedding_words(list(names)).sub(tokens, text)


def chunk_tokens(fragments: Sequence[tuple[str, float]], token_ids: Sequence[Sequence[int]],
                 spec: ChunkSpec, backtrack: int = COMMA_BACKTRACK) -> list[Chunk]:
    """Fragments' token ids (tokenized without BOS/EOS) as A1111's 77-token chunks.

    A chunk holds 75 tokens; when it is full and a comma came at most ``backtrack`` tokens
    earlier, what follows the comma moves to the next chunk. BREAK ends a chunk. An embedding's
    vectors are never split across chunks. There is always at least one chunk.
    """
    chunks: list[Chunk] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal tokens, weights, last_comma
        padding = CHUNK_TOKENS - len(tokens)
        chunks.append(_wrap(tokens + [spec.eos] * padding, weights + [1.0] * padding, spec))
        tokens, weights, last_comma = [], [], -1

    for (text, weight), ids in zip(fragments, token_ids):
        if (text, weight) == BREAK:
            close()
            continue
        position = 0
        while position < len(ids):
            token = ids[position]
            if token == spec.comma:
                last_comma = len(tokens)
            elif backtrack and len(tokens) == CHUNK_TOKENS and last_comma != -1 \
                    and len(tokens) - last_comma <= backtrack:
                cut = last_comma + 1  # the text after the comma starts the next chunk
                moved = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                close()
                tokens, weights = list(moved[0]), list(moved[1])
            if len(tokens) == CHUNK_TOKENS:
                close()
            length = min(spec.vectors.get(token, 1), len(ids) - position)
            if length > 1 and len(tokens) + length > CHUNK_TOKENS:
                close()
            tokens += ids[position:position + length]
            weights += [weight] * length
            position += length
    if tokens or not chunks:
        close()
    return chunks


def _wrap(tokens: list[int], weights: list[float], spec: ChunkSpec) -> Chunk:
    """BOS + tokens + EOS; after the first EOS the tokenizer's pad id where it differs (SDXL's CLIP-G)."""
    ids = [spec.bos, *tokens, spec.eos]
    if spec.pad != spec.eos:
        first_eos = ids.index(spec.eos)
        ids = ids[:first_eos + 1] + [spec.pad] * (len(ids) - first_eos - 1)
    return Chunk(ids, [1.0, *weights, 1.0])


def prompt_chunks(tokenizer, prompt: str, backtrack: int = COMMA_BACKTRACK) -> list[Chunk]:
    """A prompt (A1111 syntax; ``<lora:...>`` tags dropped) as 77-token chunks for this tokenizer."""
    text, _ = extract_networks(prompt)
    fragments = parse_prompt_attention(text)
    names = embedding_names(tokenizer)
    texts = [use_embeddings(fragment_text, names) for fragment_text, _ in fragments]
    ids = tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]
    return chunk_tokens(fragments, ids, ChunkSpec.of(tokenizer), backtrack)


# ---------------------------------------------------------------------------------------------
# Encoding: chunk by chunk through a CLIP text encoder, weighted, joined

#: token ids (chunks, 77) -> (hidden states (chunks, 77, features), pooled (chunks, features) or None)
Encoder = Callable[[Any], tuple[Any, Any]]


def clip_encoder(text_encoder, clip_skip: int = 1, *, penultimate: bool = False) -> Encoder:
    """An `Encoder` over a transformers CLIP text model, with A1111's Clip skip.

    SD 1.x (``penultimate=False``): clip_skip 1 is the last layer's output; n > 1 is the n-th
    layer from the end through the final layer norm (A1111; diffusers' ``clip_skip=n-1``).
    SDXL (``penultimate=True``, as diffusers and A1111 encode SDXL): the layer before the last,
    without the final norm, and n > 1 goes n-1 layers further back. The pooled output is the
    projected ``text_embeds`` of a model with a projection (SDXL's CLIP-G), else ``pooler_output``.
    """

    # transformers 5 flattened CLIPTextModel (final_layer_norm on the model); 4.x had .text_model
    final_layer_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm

    def encode(ids):
        output = text_encoder(ids.to(text_encoder.device), output_hidden_states=True)
        if penultimate:
            hidden = output.hidden_states[-1 - clip_skip]
        elif clip_skip > 1:
            hidden = final_layer_norm(output.hidden_states[-clip_skip])
        else:
            hidden = output[0]
        pooled = getattr(output, "text_embeds", None)
        return hidden, pooled if pooled is not None else getattr(output, "pooler_output", None)

    return encode


def apply_emphasis(hidden, weights):
    """A1111's "Original" emphasis: scale each token's states by its weight, then restore each chunk's mean."""
    original = hidden.mean(dim=(1, 2), keepdim=True)
    scaled = hidden * weights.to(hidden.device, hidden.dtype)[..., None]
    return scaled * (original / scaled.mean(dim=(1, 2), keepdim=True))


#: Chunks per text-encoder call on a GPU when prompts are encoded together: every call has this
#: shape (the last padded), so a prompt's states do not depend on which prompts share its call.
ROWS_PER_CALL = 8


def rows_per_call(device) -> int | None:
    """How chunks are grouped into encoder calls: ``ROWS_PER_CALL`` fixed-shape rows on a GPU;
    on the CPU each prompt's chunks alone (MKL's results depend on the row count, and one prompt
    per call costs no more there)."""
    return None if str(device) == "cpu" else ROWS_PER_CALL


def encode_prompt_chunks(tokenizer, encoder: Encoder, prompt: str, *, emphasis: bool = True,
                         backtrack: int = COMMA_BACKTRACK, max_chunks: int | None = None,
                         group: int | None = None):
    """One prompt's hidden states (77 x chunks, features) and its first chunk's pooled output (or None).

    ``emphasis=False`` is A1111's "Ignore": weights parsed and dropped. ``max_chunks`` encodes only
    the first chunks (SD3's and FLUX.1's CLIP parts read one). ``group`` as in `encode_many`.
    """
    return encode_many(tokenizer, encoder, [prompt], emphasis=emphasis, backtrack=backtrack,
                       max_chunks=max_chunks, group=group)[0]


def encode_many(tokenizer, encoder: Encoder, prompts: Sequence[str], *, emphasis: bool = True,
                backtrack: int = COMMA_BACKTRACK, max_chunks: int | None = None, group: int | None = None):
    """`encode_prompt_chunks` of several prompts, as a list, with their chunks batched into encoder calls.

    ``group=None`` calls the encoder once per prompt; ``group=n`` puts all prompts' chunks
    through calls of exactly ``n`` rows (the last padded with copies of its last row), so a batch
    of prompts costs one or a few calls and each prompt gets the states it gets alone.
    """
    import torch

    chunked = [prompt_chunks(tokenizer, prompt, backtrack)[:max_chunks] for prompt in prompts]
    with torch.inference_mode():
        if group is None:
            outputs = [encoder(torch.tensor([chunk.tokens for chunk in chunks])) for chunks in chunked]
        else:
            every = torch.tensor([chunk.tokens for chunks in chunked for chunk in chunks])
            outputs = _grouped(encoder, every, group, [len(chunks) for chunks in chunked])
        results = []
        for chunks, (hidden, pooled) in zip(chunked, outputs):
            weights = torch.tensor([chunk.weights for chunk in chunks])
            if emphasis and bool((weights != 1.0).any()):
                hidden = apply_emphasis(hidden, weights)
            results.append((hidden.reshape(-1, hidden.shape[-1]), None if pooled is None else pooled[0]))
    return results


def _grouped(encoder: Encoder, ids, group: int, counts: Sequence[int]) -> list:
    """``encoder`` over ``ids`` in calls of exactly ``group`` rows, split back into each prompt's
    ``counts`` chunks: [(hidden, pooled or None)] per prompt."""
    import torch

    outputs = [encoder(rows) for rows in fixed_chunks(ids, group)]
    hidden = torch.cat([hidden for hidden, _ in outputs])[:len(ids)].split(list(counts))
    if outputs[0][1] is None:
        return [(states, None) for states in hidden]
    pooled = torch.cat([pooled for _, pooled in outputs])[:len(ids)].split(list(counts))
    return list(zip(hidden, pooled))


def pad_chunks(hiddens: Sequence, empty) -> list:
    """Hidden states of several prompts made one length by appending the empty prompt's chunk.

    A1111's "pad prompt/negative prompt" does the same, so prompt and negative prompt can share
    one batch; ``empty`` is `encode_prompt_chunks` of "" (77, features).
    """
    import torch

    longest = max(hidden.shape[0] for hidden in hiddens)
    return [torch.cat([hidden, *[empty] * ((longest - hidden.shape[0]) // empty.shape[0])]) for hidden in hiddens]


def encode_prompts(tokenizer, encoder: Encoder, prompts: Sequence[str], *, emphasis: bool = True):
    """Several prompts (prompts and negative prompts alike), padded to the same number of chunks.

    Returns hidden states (prompts, 77 x chunks, features) and pooled outputs (prompts, features)
    or None when the encoder has no pooled output.
    """
    import torch

    encoded = encode_many(tokenizer, encoder, prompts, emphasis=emphasis)
    hiddens = [hidden for hidden, _ in encoded]
    if len({hidden.shape[0] for hidden in hiddens}) > 1:
        hiddens = pad_chunks(hiddens, encode_prompt_chunks(tokenizer, encoder, "")[0])
    pooled = [pool for _, pool in encoded]
    return torch.stack(hiddens), None if pooled[0] is None else torch.stack(pooled)


# ---------------------------------------------------------------------------------------------
# T5 (SD3, FLUX.1): one sequence, no chunks; the same syntax and emphasis


def t5_tokens(tokenizer, prompt: str, length: int) -> tuple[list[int], list[float], bool]:
    """A prompt (A1111 syntax) as ``length`` T5 token ids with a weight each, and whether it was cut.

    T5 reads one sequence of any length with relative positions, so there are no chunks: the
    fragments' tokens follow each other (BREAK is dropped), then EOS and padding, as the
    pipelines' ``max_sequence_length`` padding does. A plain prompt gives the pipelines' ids.
    """
    text, _ = extract_networks(prompt)
    fragments = [(fragment, weight) for fragment, weight in parse_prompt_attention(text)
                 if (fragment, weight) != BREAK]
    ids_per_fragment = tokenizer([f for f, _ in fragments], add_special_tokens=False)["input_ids"] if fragments else []
    ids, weights = [], []
    for (_, weight), fragment_ids in zip(fragments, ids_per_fragment):
        ids += fragment_ids
        weights += [weight] * len(fragment_ids)
    cut = len(ids) > length - 1
    ids, weights = ids[:length - 1] + [tokenizer.eos_token_id], weights[:length - 1] + [1.0]
    padding = length - len(ids)
    return ids + [tokenizer.pad_token_id] * padding, weights + [1.0] * padding, cut


def encode_t5(encoder, tokenizer, prompt: str, length: int, *, emphasis: bool = True):
    """T5 hidden states (length, features) of a prompt, weighted with A1111's "Original" emphasis
    over the whole sequence (what Forge does for FLUX.1's T5); warns when the prompt is cut."""
    import sys

    import torch

    ids, weights, cut = t5_tokens(tokenizer, prompt, length)
    if cut:
        print(f"sdbatch: prompt cut to {length} T5 tokens (text: {{t5_tokens: 512}} reads more): "
              f"{prompt[:60]!r}...", file=sys.stderr)
    with torch.inference_mode():
        hidden = encoder(torch.tensor([ids], device=encoder.device), output_hidden_states=False)[0]
        weights = torch.tensor([weights])
        if emphasis and bool((weights != 1.0).any()):
            hidden = apply_emphasis(hidden, weights)
    return hidden[0]


def first_chunk(tokenizer, encoder: Encoder, prompt: str, *, emphasis: bool = True):
    """(hidden states (77, features), pooled) of a prompt's first A1111 chunk: the CLIP parts of
    SD3 and FLUX.1, whose pipelines read 77 tokens (T5 carries the long context)."""
    return encode_prompt_chunks(tokenizer, encoder, prompt, emphasis=emphasis, max_chunks=1)
