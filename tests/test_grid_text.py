"""The words on grids and strips, and edit images' names: exact text, no model loaded."""

from __future__ import annotations

from types import SimpleNamespace

from PIL import ImageFont

from sdbatch.job import load_job_text
from sdbatch.output import render_template
from sdbatch_plugins.images import DEFAULT_PATH
from sdbatch_plugins.xyz_grid import grid_text, wrap_words

MEASURE = ImageFont.load_default(size=14).getlength


def options(x, y=None):
    return SimpleNamespace(x=x, y=y)


def test_labels_break_between_words_never_inside_one():
    assert wrap_words("colorgrade.saturation: 1", MEASURE, 64) == ["colorgrade.saturation:", "1"]
    assert wrap_words("red circle in the centre", MEASURE, 64) == ["red circle", "in the", "centre"]
    for width in (20, 64, 128):
        for line in wrap_words("a large yellow triangle, on a black background", MEASURE, width):
            assert all(word in "a large yellow triangle, on a black background".split() for word in line.split())


def test_an_axis_name_too_wide_for_its_cells_is_stated_once_in_the_title():
    text = grid_text(options("colorgrade.saturation", "seed"), {"colorgrade.saturation": [1, 0], "seed": [1, 2]},
                     {}, MEASURE, 64, 360)
    assert text.title == ["columns: colorgrade.saturation"]
    assert text.columns == [["1"], ["0"]]
    assert text.rows == ["seed: 1", "seed: 2"]


def test_a_shared_prompt_prefix_and_suffix_are_stated_once():
    prompts = ["a large red circle in the centre, on a yellow background",
               "a large blue square in the centre, on a black background"]
    text = grid_text(options("prompt", "seed"), {"prompt": prompts, "seed": [1]}, {}, MEASURE, 128, 600)
    assert text.title == ["prompt: a large … background"]
    assert text.columns == [["red circle in the", "centre, on a yellow"], ["blue square in the", "centre, on a black"]]


def test_a_strip_title_names_its_direction_and_source(registry):
    job = load_job_text("""
        edit:
          source: {prompt: "a large red circle in the centre, on a white background", seed: 7}
          directions: [{kind: prompt-difference, from: "a large red circle", to: "a large blue circle"}]
          strengths: [-1, 0, 1]
        outputs: [png, strip]
        """, registry)
    item = next(iter(job.plan.items(0, 1)))
    fixed = {name: item.axes[name] for name in ("direction", "source")}
    text = grid_text(options("strength"), {"strength": [-1.0, 0.0, 1.0]}, fixed, MEASURE, 128, 600)
    assert text.title == ["direction: 0: a large red circle -> a large blue circle",
                          "source: 0: a large red circle in the centre, on a … (seed 7)"]
    assert text.columns == [["strength: -1.0"], ["strength: 0.0"], ["strength: 1.0"]]


def test_edit_images_get_distinct_names_that_say_what_they_are(registry):
    job = load_job_text("""
        edit:
          source: {prompt: "a red circle", seed: 7}
          directions:
            - {kind: prompt-difference, from: "a red circle", to: "a blue circle"}
            - {kind: local-basis, timestep: 0.6, count: 2}
          strengths: [-1, 1]
        outputs: [png]
        """, registry)
    names = [render_template(DEFAULT_PATH, item, "png") for item in job.plan.items(0, len(job.plan))]
    assert len(set(names)) == len(names) == 6
    assert [name.rsplit("-", 1)[0] for name in names] == [
        "a-red-circle/7_strength=-1.0_direction=0_a_red_circle_-_a_blue",
        "a-red-circle/7_strength=1.0_direction=0_a_red_circle_-_a_blue",
        "a-red-circle/7_strength=-1.0_direction=1_local_basis_1_2_t_0.6",
        "a-red-circle/7_strength=1.0_direction=1_local_basis_1_2_t_0.6",
        "a-red-circle/7_strength=-1.0_direction=2_local_basis_2_2_t_0.6",
        "a-red-circle/7_strength=1.0_direction=2_local_basis_2_2_t_0.6",
    ]


def test_grid_file_names_cut_between_words():
    from sdbatch_plugins.xyz_grid import _short

    assert _short("a large blue circle on the right, on a green background") == "a-large-blue-circle-on"
    assert _short("seed 7") == "seed-7"
    assert _short("supercalifragilisticexpialidocious-and-more") == "supercalifragilisticexpi"
