"""Built-in samplers: diffusers schedulers behind the names AUTOMATIC1111 users know.

Each A1111 name maps to a scheduler class plus config overrides; every diffusers class
name works too. Karras and exponential sigma variants exist where the scheduler has them.
"""

from __future__ import annotations

from sdbatch import hookimpl
from sdbatch.api import Sampler

KARRAS = {"use_karras_sigmas": True}
EXPONENTIAL = {"use_exponential_sigmas": True}
SDE_2M = {"algorithm_type": "sde-dpmsolver++"}

#: A1111 name -> (diffusers scheduler class, config overrides)
A1111_SAMPLERS = {
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM++ 2S a": ("DPMSolverSinglestepScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", SDE_2M),
    "DPM fast": ("DPMSolverSinglestepScheduler", {"solver_order": 1}),
    "DDIM": ("DDIMScheduler", {}),
    "DDPM": ("DDPMScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "PNDM": ("PNDMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "DEIS": ("DEISMultistepScheduler", {}),
}

#: Schedulers that accept use_karras_sigmas / use_exponential_sigmas.
SIGMA_VARIANTS = {
    "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE",
    "UniPC", "DEIS",
}

#: Extra diffusers scheduler classes offered under their own names.
OTHER_CLASSES = ("EDMEulerScheduler", "LCMScheduler", "TCDScheduler")


#: Flow-matching samplers (SD3, FLUX.1): name -> (diffusers scheduler class, config overrides)
FLOW_SAMPLERS = {
    "Flow Euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "Flow Euler Karras": ("FlowMatchEulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "Flow Euler Exponential": ("FlowMatchEulerDiscreteScheduler", {"use_exponential_sigmas": True}),
    "Flow Euler Beta": ("FlowMatchEulerDiscreteScheduler", {"use_beta_sigmas": True}),
    "Flow Heun": ("FlowMatchHeunDiscreteScheduler", {}),
}


def flow_samplers() -> list[tuple[Sampler, tuple]]:
    """The flow-matching samplers, for families whose sampler_kind is "flow"."""
    result = []
    for name, (cls, config) in FLOW_SAMPLERS.items():
        description = f"{cls}({', '.join(f'{k}={v!r}' for k, v in config.items())}) for flow-matching models"
        aliases = {name.lower(), name.lower().replace(" ", "_")} | ({cls} if not config else set())
        result.append((Sampler(name, cls, config, description, kind="flow"), tuple(sorted(aliases - {name}))))
    return result


def builtin_samplers() -> list[tuple[Sampler, tuple]]:
    """Every built-in sampler with its aliases (lower-case and class-name forms)."""
    result = []
    for name, (cls, config) in A1111_SAMPLERS.items():
        variants = [(name, config)]
        if name in SIGMA_VARIANTS:
            variants += [(f"{name} Karras", {**config, **KARRAS}), (f"{name} Exponential", {**config, **EXPONENTIAL})]
        for variant, variant_config in variants:
            description = f"{cls}({', '.join(f'{k}={v!r}' for k, v in variant_config.items())})"
            aliases = {variant.lower(), variant.lower().replace(" ", "_").replace("+", "p")} - {variant}
            if variant_config == {} and cls not in {s.scheduler for s, _ in result}:
                aliases.add(cls)  # the diffusers class name selects the plain recipe
            result.append((Sampler(variant, cls, variant_config, description), tuple(sorted(aliases))))
    for cls in OTHER_CLASSES:
        result.append((Sampler(cls, cls, {}, cls), ()))
    return result


@hookimpl(trylast=True)
def register_samplers(register):
    """A1111 sampler names and diffusers class names."""
    for sampler, aliases in builtin_samplers() + flow_samplers():
        register(sampler, aliases=aliases)
