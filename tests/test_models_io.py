"""Checkpoint I/O: torch files read without torch; saved models (`artifacts`), today's format and
the earlier ones."""

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
import torch_reference as ref  # noqa: E402

from bana_jax import artifacts, builders  # noqa: E402
from bana_jax.models import DeepLab  # noqa: E402
from bana_jax.models.torch_import import load_checkpoint, torch_state_dict  # noqa: E402
from bana_jax.models.torch_io import read_state_dict, read_torch_file_numpy  # noqa: E402
from bana_jax.config import base_config  # noqa: E402

TINY = (8, 16, 32, 32, 32)


def sample_state_dict():
    gen = torch.Generator().manual_seed(0)
    sd = ref.ConvBnRef(3, 4, 3, 1, 1, 1, True, 0.1).state_dict()
    sd = {k: (torch.randn(v.shape, generator=gen) if v.is_floating_point() else v + 7) for k, v in sd.items()}
    # A non-contiguous view sharing storage with another tensor, and an int64 / bool tensor.
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    sd["view_t"] = base.t()
    sd["view_row"] = base[2]
    sd["flags"] = torch.tensor([True, False, True])
    return sd


@pytest.mark.parametrize("zip_format", [True, False])
def test_torch_files_read_without_torch(tmp_path, zip_format):
    sd = sample_state_dict()
    path = tmp_path / "w.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
    ours = read_torch_file_numpy(path)
    assert list(ours) == list(sd)
    for key, value in sd.items():
        assert ours[key].dtype == value.numpy().dtype, key
        np.testing.assert_array_equal(ours[key], value.numpy(), err_msg=key)
    via_torch = read_state_dict(path)
    np.testing.assert_array_equal(via_torch["view_t"], sd["view_t"].numpy())


def test_load_checkpoint_from_pt_file(tmp_path):
    net = ref.randomise_(ref.LabelerRef(4, (8, 16, 32, 32, 32), 64), seed=3)
    torch.save(net.state_dict(), tmp_path / "labeler.pt")
    model = nnx.eval_shape(lambda: DeepLab("tiny", 4, classifier="dot", rngs=nnx.Rngs(0)))
    load_checkpoint(model, tmp_path / "labeler.pt")
    ours = torch_state_dict(model)
    for key, value in net.state_dict().items():
        np.testing.assert_array_equal(ours[key], value.numpy(), err_msg=key)


def test_saved_variables_round_trip_and_fill_an_abstract_model(tmp_path):
    net = ref.randomise_(ref.DeepLabV2Ref(3, n_blocks=(1, 1, 1, 1), base=8, aspp_dim=8), seed=4)
    factory = lambda: DeepLab("v2", 3, resnet_blocks=(1, 1, 1, 1), resnet_base_width=8, aspp_dim=8,  # noqa: E731
                              rngs=nnx.Rngs(0))
    model = nnx.eval_shape(factory)
    load_checkpoint(model, net.state_dict())
    info = {"format": artifacts.FORMAT, "kind": "deeplab"}
    artifacts.save_model(model, tmp_path, info)
    artifacts.save_model(model, tmp_path, info)  # overwriting is allowed
    restored = artifacts.fill_variables(nnx.eval_shape(factory), artifacts.restore(tmp_path / "model"), "x")
    ours, back = torch_state_dict(model), torch_state_dict(restored)
    assert ours.keys() == back.keys()
    for key in ours:
        np.testing.assert_array_equal(back[key], ours[key], err_msg=key)
    other = nnx.eval_shape(lambda: DeepLab("v2", 4, resnet_blocks=(1, 1, 1, 1), resnet_base_width=8, aspp_dim=8,
                                           rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"x: .*has shape \(8, 3\), the model expects \(8, 4\)"):
        artifacts.fill_variables(other, artifacts.restore(tmp_path / "model"), "x")
    with pytest.raises(FileNotFoundError, match="holds no trained labeler"):
        artifacts.load_model(tmp_path / "missing", "labeler")


def _tiny(kind):
    config = base_config()
    config.model.name, config.model.num_classes, config.model.init = "vgg_tiny", 4, "none"
    build = builders.build_labeler if kind == "labeler" else builders.build_deeplab
    return config, build(config)


def _same_weights(a, b):
    sa, sb = torch_state_dict(a), torch_state_dict(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        np.testing.assert_array_equal(sa[key], sb[key], err_msg=key)


@pytest.mark.parametrize("kind", ["labeler", "deeplab"])
def test_saved_model_rebuilds_in_eval_mode(kind, tmp_path):
    config, model = _tiny(kind)
    artifacts.save_model(model, tmp_path, artifacts.model_config(config, kind, step=3))
    loaded = artifacts.load_model(tmp_path, kind)
    _same_weights(model, loaded)
    assert artifacts.model_info(tmp_path)["step"] == 3
    with pytest.raises(ValueError, match=f"holds a {kind}, not a"):
        artifacts.load_model(tmp_path, "deeplab" if kind == "labeler" else "labeler")


def _orbax_save(path, tree):
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path.absolute(), tree)


def test_workdirs_of_the_earlier_formats_still_load(tmp_path):
    """Stage 1 wrote labeler.json + labeler/ {"variables"}, stage 3 deeplab.json + model/
    {"params", "model_state"} (nnx States), `save_params` a bare {Param, BatchStat} tree."""
    import json

    config, labeler = _tiny("labeler")
    old1 = tmp_path / "stage1"
    _, _, variables = nnx.split(labeler, nnx.RngState, ...)
    _orbax_save(old1 / "labeler", {"variables": nnx.to_pure_dict(variables)})
    (old1 / "labeler.json").write_text(json.dumps({"model": config.model.to_dict(), "step": 5, "pooling": "bap"}))
    _same_weights(labeler, artifacts.load_model(old1, "labeler"))
    assert artifacts.model_info(old1)["step"] == 5

    config, deeplab = _tiny("deeplab")
    old3 = tmp_path / "stage3"
    _, params, _, model_state = nnx.split(deeplab, nnx.Param, nnx.RngState, ...)
    _orbax_save(old3 / "model", {"params": params, "model_state": model_state})
    (old3 / "deeplab.json").write_text(json.dumps({"model": config.model.to_dict(), "tau": 20.0, "seed": 0}))
    _same_weights(deeplab, artifacts.load_model(old3, "deeplab"))

    bare = tmp_path / "bare"
    _orbax_save(bare, nnx.to_pure_dict(nnx.state(deeplab, (nnx.Param, nnx.BatchStat))))
    config.model.init = str(bare)
    _, fresh = _tiny("deeplab")
    _same_weights(deeplab, artifacts.init_weights(fresh, config))


@pytest.mark.parametrize("arch", ["labeler", "deeplab_v1", "deeplab_v2"])
def test_compare_torch_cli(tmp_path, capsys, arch):
    from bana_jax import compare_torch

    if arch == "labeler":
        net = ref.randomise_(ref.LabelerRef(5, TINY, 64), seed=5)
    elif arch == "deeplab_v1":  # LargeFOV: fc6 dilation 12 on a 4 x 4 map (mostly padding)
        net = ref.randomise_(ref.DeepLabV1Ref(5, TINY, 64), seed=7)
    else:
        net = ref.randomise_(ref.DeepLabV2Ref(5, n_blocks=(1, 2, 1, 1), base=8, aspp_dim=8), seed=6)
    torch.save(net.state_dict(), tmp_path / "net.pt")
    rc = compare_torch.main(["--arch", arch, "--checkpoint", str(tmp_path / "net.pt"), "--size", "27", "30"])
    out = capsys.readouterr().out
    assert rc == 0, out
    stages = (["layer1", "layer5", "aspp", "scores"] if arch == "deeplab_v2"
              else ["pool1", "pool5", "fc7", "scores"])
    for stage in stages:
        assert stage in out
    assert "OK" in out
    # A checkpoint of the wrong architecture fails loudly (labeler and LargeFOV share their keys).
    with pytest.raises(ValueError, match="no key"):
        compare_torch.main(["--arch", "labeler" if arch == "deeplab_v2" else "deeplab_v2",
                            "--checkpoint", str(tmp_path / "net.pt")])


def vgg_caffe_state_dict(with_fc: bool, seed: int = 8) -> dict:
    """A fake `vgg_caffe.pth` for the tiny VGG: conv1_1 ... conv5_3 (+ fc6, fc7) without the
    `backbone.` prefix, and a Caffe classifier fc8 of another class count."""
    sd = ref.randomise_(ref.VGGRef(1, TINY, 64), seed=seed).state_dict()
    if not with_fc:
        sd = {k: v for k, v in sd.items() if not k.startswith(("fc6.", "fc7."))}
    gen = torch.Generator().manual_seed(seed)
    sd["fc8.weight"] = torch.randn(10, 64, 1, 1, generator=gen)
    sd["fc8.bias"] = torch.randn(10, generator=gen)
    return sd


def tiny_labeler_config(init: str):
    config = base_config()
    config.model.name = "vgg_tiny"
    config.model.num_classes = 4
    config.model.init = init
    return config


@pytest.mark.parametrize("with_fc", [True, False])
def test_vgg_caffe_init_through_config(tmp_path, with_fc):
    """`model.init=vgg_caffe.pth` loads the backbone (fc6/fc7 when present); the classifier and,
    without them, fc6/fc7 keep their random init."""
    sd = vgg_caffe_state_dict(with_fc)
    torch.save(sd, tmp_path / "vgg_caffe.pth")
    config = tiny_labeler_config(str(tmp_path / "vgg_caffe.pth"))
    model = builders.build_labeler(config)
    before = torch_state_dict(model)
    artifacts.init_weights(model, config)
    after = torch_state_dict(model)
    assert after.keys() == before.keys()
    for key in after:
        name = key.removeprefix("backbone.")  # the init's key
        if name in sd:
            np.testing.assert_array_equal(after[key], sd[name].numpy(), err_msg=key)
        else:
            assert key.startswith(("classifier.", "backbone.fc6.", "backbone.fc7.")), key
            np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    assert sum(k.removeprefix("backbone.") in sd for k in after) == 26 + (4 if with_fc else 0)


def test_checkpoint_of_unknown_layout_lists_its_keys(tmp_path):
    torch.save({"_conv_stem.weight": torch.zeros(32, 3, 3, 3), "_bn0.weight": torch.ones(32)},
               tmp_path / "other.pth")
    config = tiny_labeler_config(str(tmp_path / "other.pth"))
    model = nnx.eval_shape(lambda: builders.build_labeler(config))
    listed = r"unrecognised checkpoint layout.*\['_bn0.weight', '_conv_stem.weight'\]"
    with pytest.raises(ValueError, match=listed):
        artifacts.init_weights(model, config)
    # A VGG init with a layer missing, or for a network without a VGG backbone, is refused too.
    partial = vgg_caffe_state_dict(with_fc=True)
    del partial["fc7.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['fc7.bias'\]"):
        load_checkpoint(model, partial)
    resnet = nnx.eval_shape(lambda: DeepLab("v2", 3, resnet_blocks=(1, 1, 1, 1), resnet_base_width=8,
                                            aspp_dim=8, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="needs a model with a VGG backbone"):
        load_checkpoint(resnet, vgg_caffe_state_dict(with_fc=True))
