"""Config files, the schema check, overrides and shrinking."""

import re
from pathlib import Path

import numpy as np
import pytest

from bana_jax.config import (ConfigError, apply_overrides, base_config, config_names, load_config,
                             shrink_config, validate_config)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL_CONFIGS = sorted(CONFIGS.glob("*/*.py"))


def test_expected_config_files_exist():
    names = {str(p.relative_to(CONFIGS)) for p in ALL_CONFIGS}
    for expected in ("voc/stage1.py", "voc/stage2.py", "voc/stage3_deeplab_v1.py",
                     "voc/stage3_deeplab_v2.py", "coco/stage1.py", "coco_subset/stage1.py",
                     "coco_subset/stage2.py", "demo/demo.py"):
        assert expected in names


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_config_validates_and_shrinks(path):
    config = validate_config(load_config(path))
    assert config.is_locked
    small = validate_config(shrink_config(config))
    assert small.train.num_steps <= 30 and small.data.batch_size <= 4
    assert all(b <= small.train.num_steps for b in small.optim.step_boundaries)


def test_voc_stage1_has_the_paper_values():
    c = load_config(CONFIGS / "voc/stage1.py")
    assert (c.optim.lr, c.optim.momentum, c.train.num_steps) == (1e-3, 0.9, 8000)
    assert (c.optim.schedule, tuple(c.optim.step_boundaries), c.optim.step_gamma) == (
        "step", (5000,), 0.1)
    assert (c.data.batch_size, c.data.crop_size) == (20, 321)
    assert tuple(c.data.scale_range) == (0.5, 1.5)
    groups = {k: (g.lr_mult, g.weight_decay) for k, g in c.optim.groups.items()}
    assert groups == {"pretrained_weight": (1.0, 5e-4), "pretrained_bias": (2.0, 0.0),
                      "new_weight": (10.0, 5e-4), "new_bias": (20.0, 0.0)}
    assert (c.loss.pooling, c.loss.grid_size, c.loss.gap_fallback_bg_fraction) == (
        "bap", 4, 0.125)
    assert c.model.num_classes == 21 and c.model.dropout == 0.5


def test_voc_stage2_and_stage3_values():
    s2 = load_config(CONFIGS / "voc/stage2.py")
    assert [s2.crf[k] for k in ("bi_w", "bi_xy_std", "bi_rgb_std", "pos_w", "pos_xy_std")] == [
        4, 55, 3, 3, 3]
    assert s2.crf.iterations == 10
    v1 = load_config(CONFIGS / "voc/stage3_deeplab_v1.py")
    assert (v1.optim.lr, v1.data.batch_size, v1.data.crop_size, v1.train.num_steps) == (
        1e-3, 20, 321, 23805)
    assert (v1.optim.schedule, v1.optim.poly_power, v1.model.fc6_dilation) == ("poly", 0.9, 12)
    assert [v1.crf[k] for k in ("bi_w", "bi_xy_std", "bi_rgb_std", "pos_w", "pos_xy_std")] == [
        4, 121, 5, 3, 3]
    assert (v1.loss.tau, v1.loss.gamma, v1.loss.weight, v1.loss.detach_sigma) == (
        20.0, 7.0, 0.1, False)
    v2 = load_config(CONFIGS / "voc/stage3_deeplab_v2.py")
    assert (v2.optim.lr, v2.data.batch_size, v2.train.num_steps) == (2.5e-4, 10, 20000)
    assert v2.optim.groups.pretrained_weight.lr_mult == 1.0
    assert v2.optim.groups.new_weight.lr_mult == 10.0
    assert [v2.crf[k] for k in ("bi_w", "bi_xy_std", "bi_rgb_std", "pos_w", "pos_xy_std")] == [
        4, 67, 3, 3, 1]
    assert tuple(v1.eval.scales) == (1.0, 0.5, 0.75, 1.5) and v1.eval.flip


def test_coco_subset_has_data_fields():
    c = load_config(CONFIGS / "coco_subset/stage1.py")
    c = apply_overrides(c, [("data.images", "/x/images"), ("data.annotations", "/x/i.json")])
    assert (c.data.images, c.data.annotations) == ("/x/images", "/x/i.json")


def test_data_skip_bad_is_off_by_default_and_overridable():
    config = validate_config(base_config())
    assert config.data.skip_bad is False
    assert apply_overrides(config, [("data.skip_bad", "true")]).data.skip_bad is True
    with pytest.raises(ConfigError, match="expected a boolean"):
        apply_overrides(config, [("data.skip_bad", "sometimes")])


def test_validate_names_unknown_missing_and_wrong_fields():
    config = base_config()
    config.train.num_step = 5  # typo, on an unlocked config
    with pytest.raises(ConfigError, match=r"unknown field 'train.num_step'.*'train.num_steps'"):
        validate_config(config)

    config = base_config()
    del config.optim["momentum"]
    with pytest.raises(ConfigError, match="missing field 'optim.momentum'"):
        validate_config(config)

    config = base_config()
    config.unlock()
    del config.train["seed"]
    config.train.seed = "zero"
    with pytest.raises(ConfigError, match="'train.seed' = 'zero' has type str, expected int"):
        validate_config(config)

    config = base_config()
    config.optim.schedule = "cosine"
    with pytest.raises(ConfigError, match="'optim.schedule' = 'cosine'"):
        validate_config(config)

    config = base_config()
    config.data.batch_size = 0
    with pytest.raises(ConfigError, match="'data.batch_size' = 0"):
        validate_config(config)

    config = base_config()
    config.optim.step_boundaries = (6000, 5000)
    with pytest.raises(ConfigError, match="optim.step_boundaries"):
        validate_config(config)


@pytest.mark.parametrize("field, value", [("crf.bi_rgb_std", 0.0), ("crf.bi_xy_std", -1.0),
                                          ("crf.pos_xy_std", float("nan")), ("crf.bi_w", float("inf")),
                                          ("crf.pos_w", float("-inf")),
                                          # would overflow the lattice at the first image (255 / 1e-7 > 1e6)
                                          ("crf.bi_rgb_std", 1e-7), ("crf.pos_xy_std", 1e-3)])
def test_crf_fields_are_checked_at_start(field, value):
    config = apply_overrides(base_config(), [(field, str(value))])  # as from the command line
    with pytest.raises(ConfigError, match=re.escape(f"'{field}' = {value!r}: expected a finite number")):
        validate_config(config)


def test_the_smallest_crf_deviations_allowed_run_in_crf_ext():
    """The config's minima are inside crf_ext's lattice bound on a 10000-px-wide white image."""
    import crf_ext

    config = validate_config(apply_overrides(base_config(), [
        ("crf.bi_rgb_std", "2.56e-4"), ("crf.bi_xy_std", "0.01"), ("crf.pos_xy_std", "0.01")]))
    image = np.full((1, 10000, 3), 255, np.uint8)
    probs = np.full((2, 1, 10000), 0.5, np.float32)
    out = crf_ext.dense_crf(image, probs, bi_w=1, bi_xy_std=config.crf.bi_xy_std, bi_rgb_std=config.crf.bi_rgb_std,
                            pos_w=1, pos_xy_std=config.crf.pos_xy_std, n_iter=1)
    assert out.shape == probs.shape and np.all(np.isfinite(out))


def test_overrides_parse_by_field_type():
    config = validate_config(base_config())
    config = apply_overrides(config, [
        ("train.num_steps", "12"), ("optim.lr", "0.5"), ("optim.lr", "1e-2"),
        ("data.flip", "false"), ("train.tensorboard", "True"), ("model.init", "/w/vgg.h5"),
        ("eval.scales", "(1.0, 0.5)"), ("optim.step_boundaries", "3,7"),
        ("data.scale_range", "[1, 2]"), ("optim.groups.new_weight.lr_mult", "5"),
    ])
    assert config.train.num_steps == 12 and isinstance(config.train.num_steps, int)
    assert config.optim.lr == 1e-2
    assert config.data.flip is False and config.train.tensorboard is True
    assert config.model.init == "/w/vgg.h5"
    assert tuple(config.eval.scales) == (1.0, 0.5)
    assert tuple(config.optim.step_boundaries) == (3, 7)
    assert tuple(config.data.scale_range) == (1.0, 2.0)
    assert all(isinstance(v, float) for v in config.data.scale_range)
    assert config.optim.groups.new_weight.lr_mult == 5.0
    validate_config(config)


@pytest.mark.parametrize("name, raw, message", [
    ("train.num_step", "3", r"unknown config field 'train.num_step'.*did you mean 'train.num_steps'"),
    ("trian.seed", "3", r"unknown config field 'trian.seed'"),
    ("train.num_steps", "ten", r"--config.train.num_steps='ten': expected an integer"),
    ("optim.lr", "fast", r"expected a number"),
    ("data.flip", "maybe", r"expected a boolean"),
    ("optim", "1", r"expected a field inside the group"),
    ("eval.scales", "('a', 'b')", r"expected a tuple of float"),
])
def test_bad_overrides_name_the_field(name, raw, message):
    config = validate_config(base_config())
    with pytest.raises(ConfigError, match=message):
        apply_overrides(config, [(name, raw)])


def test_load_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.py")
    bad = tmp_path / "bad.py"
    bad.write_text("X = 1\n")
    with pytest.raises(ConfigError, match="defines no get_config"):
        load_config(bad)
    with_arg = tmp_path / "with_arg.py"
    with_arg.write_text("from bana_jax.config import base_config\n"
                        "def get_config(arg=None):\n"
                        "    c = base_config()\n"
                        "    c.train.num_steps = int(arg) if arg else 1\n"
                        "    return c\n")
    assert load_config(f"{with_arg}:7").train.num_steps == 7


def test_packaged_configs_are_found_by_name(tmp_path, monkeypatch):
    assert config_names() == [str(p.relative_to(CONFIGS)) for p in ALL_CONFIGS]
    monkeypatch.chdir(tmp_path)  # no configs/ here
    by_path = load_config(CONFIGS / "voc/stage3_deeplab_v1.py")
    for name in ("voc/stage3_deeplab_v1.py", "configs/voc/stage3_deeplab_v1.py"):
        assert load_config(name) == by_path
    with pytest.raises(ConfigError, match=r"'voc/stage1' does not exist.*voc/stage1\.py, voc/stage2\.py"):
        load_config("voc/stage1")


def test_shrink_scales_the_schedule():
    config = validate_config(load_config(CONFIGS / "voc/stage1.py"))
    small = shrink_config(config)
    assert small.train.num_steps == 30
    assert tuple(small.optim.step_boundaries) == (5000 * 30 // 8000,)
    assert small.data.crop_size == 129 and tuple(small.eval.scales) == (1.0,)
    assert config.train.num_steps == 8000  # the original is untouched


def test_pseudo_baselines_default_off_except_the_demo():
    for name in ("voc/stage2.py", "coco_subset/stage2.py"):
        assert tuple(load_config(CONFIGS / name).pseudo.baselines) == ()
    assert tuple(load_config(CONFIGS / "demo/stage2.py").pseudo.baselines) == ("box_fill", "grabcut")


@pytest.mark.parametrize("raw, expected", [("box_fill", ("box_fill",)), ("grabcut,box_fill", ("grabcut", "box_fill")),
                                           ("('box_fill', 'grabcut')", ("box_fill", "grabcut")), ("()", ()), ("", ())])
def test_pseudo_baselines_from_the_command_line(raw, expected):
    config = validate_config(apply_overrides(base_config(), [("pseudo.baselines", raw)]))
    assert tuple(config.pseudo.baselines) == expected


@pytest.mark.parametrize("raw, message", [
    ("grabcutt", r"'pseudo.baselines' = \('grabcutt',\): unknown baseline 'grabcutt'; did you mean 'grabcut'"),
    ("box_fill,none", r"unknown baseline 'none'.*expected any of \('box_fill', 'grabcut'\)"),
    ("box_fill,box_fill", r"\['box_fill'\] given more than once"),
    ("(1, 2)", r"unknown baseline 1"),
])
def test_pseudo_baselines_are_checked_at_start(raw, message):
    config = apply_overrides(base_config(), [("pseudo.baselines", raw)])
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_pseudo_box_convention_follows_the_official_code_on_voc():
    assert load_config(CONFIGS / "voc/stage2.py").pseudo.box_convention == "official"
    for name in ("coco_subset/stage2.py", "demo/stage2.py"):  # boxes that are not VOC XML values
        assert load_config(CONFIGS / name).pseudo.box_convention == "pixels"
    config = apply_overrides(base_config(), [("pseudo.box_convention", "pixel")])
    with pytest.raises(ConfigError, match=r"'pseudo.box_convention' = 'pixel': expected one of \('official', 'pixels'\)"):
        validate_config(config)
