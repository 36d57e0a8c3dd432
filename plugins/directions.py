"""Built-in edit direction finders: prompt difference, local basis (Park et al. 2023), SEGA, file."""

from __future__ import annotations

from dataclasses import dataclass, field

from sdbatch import hookimpl
from sdbatch.api import Direction, DirectionFinder


# ---------------------------------------------------------------- prompt difference
@dataclass
class PromptDifferenceOptions:
    to: str | None = field(default=None, metadata={"help": "the prompt to move towards"})
    pairs: list[list[str]] = field(default_factory=list, metadata={
        "help": "[[from, to], ...] averaged", "items": {"min_items": 2, "max_items": 2}})
    # 'from' is a Python keyword: the job's "from:" key arrives as from_ (see validate_options).
    from_: str | None = None


class PromptDifference(DirectionFinder):
    """E(to) - E(from) on the text encoder's hidden states, averaged over sentence pairs (pix2pix-zero)."""

    name = "prompt-difference"
    requires = ("text_edit",)
    description = "text-embedding direction from prompt pairs"
    Options = PromptDifferenceOptions

    def labels(self, options) -> list[str]:
        pairs = _pairs(options)
        first = f"{pairs[0][0]} -> {pairs[0][1]}" if pairs else "?"
        return [first + (f" (+{len(pairs) - 1} pairs)" if len(pairs) > 1 else "")]

    def find(self, model, source, options) -> list:
        pairs = _pairs(options)
        delta = sum(source.embeddings(to) - source.embeddings(frm) for frm, to in pairs) / len(pairs)
        return [Direction(self.labels(options)[0], "text", delta.float().cpu(),
                          {"pairs": [list(p) for p in pairs]})]


def _pairs(options) -> list[tuple[str, str]]:
    pairs = [tuple(p) for p in options.pairs]
    if options.from_ is not None and options.to is not None:
        pairs.insert(0, (options.from_, options.to))
    return pairs


# ---------------------------------------------------------------- local basis
@dataclass
class LocalBasisOptions:
    prompt: str | None = field(default=None, metadata={"help": "condition the Jacobian on this prompt (default: the source's)"})
    timestep: float = field(default=0.6, metadata={"min": 0.05, "max": 0.95, "help": "fraction of the schedule where x_t is edited"})
    count: int = field(default=3, metadata={"min": 1, "max": 32})
    iterations: int = field(default=20, metadata={"min": 1, "max": 200})
    scale: float = field(default=0.25, metadata={"min": 0.0, "help": "strength 1 moves x_t by scale x its norm"})


class LocalBasis(DirectionFinder):
    """Top right singular vectors of d(mid-block output)/d(x_t), by power iteration with jvp/vjp."""

    name = "local-basis"
    requires = ("local_basis",)
    description = "Riemannian local basis of x_t (Park et al., NeurIPS 2023)"
    Options = LocalBasisOptions

    def labels(self, options) -> list[str]:
        prompt = f" '{options.prompt}'" if options.prompt else ""
        return [f"local basis {i + 1}/{options.count}{prompt} t={options.timestep:g}" for i in range(options.count)]

    def find(self, model, source, options) -> list:
        import torch

        x_t, step, timestep = source.latents_at(options.timestep)
        cond = source.conditioning(options.prompt if options.prompt is not None else source.prompt)
        # the family's U-Net inputs for one row (SDXL adds its pooled and size conditioning)
        inputs = model.family.unet_inputs(model, x_t[None].to(model.device, model.dtype),
                                          {name: value[None] for name, value in cond.items()},
                                          source.item.width, source.item.height)
        vectors, values = local_basis(model.unet, x_t, timestep, inputs, options.count, options.iterations,
                                      seed=source.seed)
        norm = float(x_t.norm())
        return [
            Direction(label, "latent", (vectors[:, i] * norm * options.scale).reshape(x_t.shape),
                      {"timestep": options.timestep, "step": step, "singular_value": float(values[i])})
            for i, label in enumerate(self.labels(options))
        ] if torch.is_tensor(vectors) else []


def _unet_inputs(conditioning) -> dict:
    """U-Net keyword arguments for one row: a dict as the family gives it, or text states (tokens, features)."""
    if isinstance(conditioning, dict):
        return conditioning
    return {"encoder_hidden_states": conditioning[None]}


def _mapped(value, convert):
    """``convert`` applied to every tensor in nested dicts."""
    return {k: _mapped(v, convert) for k, v in value.items()} if isinstance(value, dict) else convert(value)


def mid_block_features(unet, x_t, timestep: int, conditioning):
    """h: the U-Net's bottleneck (mid-block output) for one latent, as a differentiable function.

    ``conditioning`` is the U-Net's keyword arguments for one row (``encoder_hidden_states``
    and, on SDXL, ``added_cond_kwargs``), or text states (tokens, features) alone.
    """
    import torch

    inputs = _unet_inputs(conditioning)
    sample = x_t[None]
    hidden = inputs["encoder_hidden_states"]
    t_emb = unet.get_time_embed(sample=sample, timestep=torch.tensor([timestep], device=sample.device))
    emb = unet.time_embedding(t_emb)
    extra = unet.get_aug_embed(emb=emb, encoder_hidden_states=hidden,
                               added_cond_kwargs=inputs.get("added_cond_kwargs") or {})
    if extra is not None:  # SDXL: pooled text and size micro-conditioning
        emb = emb + extra
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    sample = unet.conv_in(sample)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            sample, _ = block(hidden_states=sample, temb=emb, encoder_hidden_states=hidden)
        else:
            sample, _ = block(hidden_states=sample, temb=emb)
    return unet.mid_block(sample, emb, encoder_hidden_states=hidden)[0]


def local_basis(unet, x_t, timestep: int, conditioning, count: int, iterations: int, seed: int = 0):
    """(n x count orthonormal right singular vectors, singular values), largest first.

    Subspace iteration on J^T J with J = dh/dx_t, over ``2 * count`` vectors so close
    singular values still separate, then a Rayleigh-Ritz step (an SVD of the small J V).
    Each round is one Jacobian-vector product (forward mode) and one vector-Jacobian
    product (reverse mode) per vector; J is never built.
    """
    import torch
    from diffusers.models.attention_processor import AttnProcessor

    processors = unet.attn_processors
    dtype = next(unet.parameters()).dtype
    unet.set_attn_processor(AttnProcessor())  # forward-mode AD needs plain attention, not SDPA
    unet.float()  # Jacobian products in float32 (fp16 -> fp32 -> fp16 round-trips exactly afterwards)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            device = next(unet.parameters()).device
            x = x_t.detach().clone().float().to(device)
            context = _mapped(_unet_inputs(conditioning), lambda v: v.detach().clone().float().to(device))

            def h(z):
                return mid_block_features(unet, z, timestep, context)

            features, pullback = torch.func.vjp(h, x)

            def push(basis):
                return torch.stack([torch.func.jvp(h, (x,), (v.reshape(x.shape),))[1].flatten() for v in basis.T],
                                   dim=1)

            generator = torch.Generator().manual_seed(int(seed))
            width = min(2 * count, x.numel())
            basis = torch.linalg.qr(torch.randn(x.numel(), width, generator=generator)).Q.to(device)
            for _ in range(iterations):
                pushed = push(basis)
                pulled = torch.stack([pullback(u.reshape(features.shape))[0].flatten() for u in pushed.T], dim=1)
                basis = torch.linalg.qr(pulled)[0]
            _, values, right = torch.linalg.svd(push(basis), full_matrices=False)  # Rayleigh-Ritz
            vectors = basis @ right.T[:, :count]
    finally:
        unet.to(dtype)
        unet.set_attn_processor(processors)
    return vectors.detach().cpu(), values[:count].detach().cpu()


# ---------------------------------------------------------------- semantic guidance
@dataclass
class SegaOptions:
    prompt: str = field(metadata={"help": "the concept to add (positive strength) or remove (negative)"})
    threshold: float = field(default=0.9, metadata={"min": 0.0, "max": 0.999, "help": "quantile below which guidance is masked"})
    warmup: float = field(default=0.1, metadata={"min": 0.0, "max": 1.0, "help": "fraction of steps before it applies"})


class Sega(DirectionFinder):
    """Semantic guidance (Brack et al. 2023): an editing prompt as extra guidance, strength = its scale."""

    name = "sega"
    requires = ("sega",)
    description = "semantic guidance with an editing prompt"
    Options = SegaOptions

    def labels(self, options) -> list[str]:
        return [f"sega '{options.prompt}'"]

    def find(self, model, source, options) -> list:
        return [Direction(self.labels(options)[0], "guidance", source.embeddings(options.prompt).float().cpu(),
                          {"prompt": options.prompt, "threshold": options.threshold, "warmup": options.warmup})]


# ---------------------------------------------------------------- saved directions
@dataclass
class FileOptions:
    path: str = field(metadata={"file": True, "format": "safetensors",
                                "help": "a .safetensors direction saved by an earlier run"})


class FileDirection(DirectionFinder):
    """A direction saved by an earlier run (safetensors with its space and metadata)."""

    name = "file"
    description = "a direction saved as safetensors"
    Options = FileOptions

    def labels(self, options) -> list[str]:
        from pathlib import Path

        return [Path(options.path).stem]

    def find(self, model, source, options) -> list:
        from sdbatch.editing import load_direction

        return [load_direction(options.path)]


@hookimpl(trylast=True)
def register_directions(register):
    """Prompt difference, local basis, SEGA and saved directions."""
    register(PromptDifference())
    register(LocalBasis())
    register(Sega())
    register(FileDirection())
