"""Every hook sdbatch calls. Plugins implement these with ``@sdbatch.hookimpl``.

Each ``register_*`` hook receives a ``register`` callback built by sdbatch: call it once
per thing you provide. sdbatch checks names, aliases and duplicates in one place, so a
plugin never has to. The objects you register are described in ``sdbatch.api``.
See docs/plugins.md for one section per hook with an example.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("sdbatch")
hookimpl = pluggy.HookimplMarker("sdbatch")


# ---------------------------------------------------------------- models
@hookspec
def register_model_loaders(register):
    """Register ModelLoader objects that turn a job's ``model:`` reference into weights.

    Call ``register(loader, override=False)``. Loaders are asked in registration order
    (plugins before built-ins); the first whose ``describe()`` accepts the reference wins.
    """


@hookspec
def register_families(register):
    """Register Family objects: model families (SD 1.x, SDXL, SD3, FLUX.1) and how to run them.

    Call ``register(family, aliases=(), override=False)``; a model's family is detected from
    its files, or named with ``model_family:`` in a job.
    """


@hookspec
def prepare_model(model):
    """Change a model after it is loaded, before it renders (e.g. apply LoRAs, compile).

    Called on every plugin with the loaded ``sdbatch.models.Model``; return nothing.
    """


# ---------------------------------------------------------------- conditioning
@hookspec
def register_conditioners(register):
    """Register Conditioner objects that turn item inputs into conditioning (text, control maps).

    Call ``register(conditioner, aliases=(), override=False)``; jobs name it under ``conditioners:``.
    """


# ---------------------------------------------------------------- sampling
@hookspec
def register_samplers(register):
    """Register Sampler objects: named scheduler recipes such as "Euler a" or "DPM++ 2M Karras".

    Call ``register(sampler, aliases=(), override=False)``; jobs name it in ``sampler:``.
    """


@hookspec
def register_directions(register):
    """Register DirectionFinder objects: ways to find edit directions in a model's latent spaces.

    Call ``register(finder, aliases=(), override=False)``; edit jobs name it as a direction's ``kind``.
    """


# ---------------------------------------------------------------- images
@hookspec
def register_postprocessors(register):
    """Register PostProcessor objects applied to each decoded image, in job order.

    Call ``register(postprocessor, aliases=(), override=False)``; jobs list it under ``postprocess:``.
    """


@hookspec
def register_writers(register):
    """Register Writer classes that store results (image files, grids, datasets, videos).

    Call ``register(writer_class, aliases=(), override=False)``; jobs list it under ``outputs:``.
    """
