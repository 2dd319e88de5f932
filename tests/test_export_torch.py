"""`bana export-torch` (official PyTorch key names, strict loading) and `bana stage2` from an official
Labeler state dict (`pseudo.labeler`)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
import torch_reference as ref  # noqa: E402

from bana_jax import cli, export_torch, models, stage2  # noqa: E402
from bana_jax.data.synthetic import SyntheticSource  # noqa: E402
from bana_jax.stage1 import export_labeler  # noqa: E402
from bana_jax.stage3 import save_trained_deeplab  # noqa: E402
from bana_jax.config import base_config  # noqa: E402

TINY, TINY_FC = (8, 16, 32, 32, 32), 64
NUM_CLASSES, SIZE = 4, 48


def randomised(factory, seed):
    """`factory()`'s module with He-normal weights, small biases and plausible BatchNorm statistics,
    drawn by NumPy (an eager random init would compile every initialiser)."""
    abstract = nnx.eval_shape(factory)
    graphdef, params, stats, rest = nnx.split(abstract, nnx.Param, nnx.BatchStat, ...)
    rng = np.random.default_rng(seed)

    def param(x):
        if len(x.shape) >= 2:
            return jnp.asarray(rng.normal(0, np.sqrt(2 / np.prod(x.shape[:-1])), x.shape), x.dtype)
        return jnp.asarray(rng.uniform(0, 0.1, x.shape), x.dtype)

    def stat(path, x):
        is_var = "['var']" in jax.tree_util.keystr(path)
        value = rng.uniform(0.5, 2.0, x.shape) if is_var else rng.normal(0, 0.1, x.shape)
        return jnp.asarray(value, x.dtype)

    params = jax.tree.map(param, params)
    stats = jax.tree_util.tree_map_with_path(stat, stats)
    rest = jax.tree.map(lambda x: jax.random.key(0) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                        else jnp.zeros(x.shape, x.dtype), rest)
    model = nnx.merge(graphdef, params, stats, rest)
    model.eval()
    return model


def tiny_config(stage: str, name: str = "vgg_tiny"):
    config = base_config()
    config.data.name = "synthetic"
    config.model.name = name
    config.model.num_classes = NUM_CLASSES
    config.model.init = "none"
    if stage == "stage3":
        config.model.fc6_dilation = 12
    return config


def tiny_labeler(seed=0):
    return randomised(lambda: models.Labeler("tiny", NUM_CLASSES, rngs=nnx.Rngs(0)), seed)


def images(shape, seed):
    return np.random.default_rng(seed).normal(0, 60, shape).astype(np.float32)


def torch_features(net, x):
    with torch.no_grad():
        out = net(torch.from_numpy(x).permute(0, 3, 1, 2))
    return out.permute(0, 2, 3, 1).numpy()


def rel_diff(a, b):
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    """A stage-1 workdir as `bana stage1` leaves it (model.json + model/), tiny trunk."""
    workdir = tmp_path_factory.mktemp("stage1")
    labeler = tiny_labeler()
    export_labeler(labeler, tiny_config("stage1"), workdir, step=1)
    return workdir, labeler


def test_export_labeler_loads_strictly_and_computes_the_same(stage1_run, tmp_path):
    workdir, labeler = stage1_run
    out = tmp_path / "sub" / "ClsNet.pt"
    assert cli.main(["export-torch", f"--workdir={workdir}", f"--out={out}"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["ClsNet.pt"]  # no temporary left
    sd = torch.load(out, weights_only=True)
    net = ref.LabelerRef(NUM_CLASSES, TINY, TINY_FC)
    net.load_state_dict(sd, strict=True)
    net.eval()
    x = images((1, 41, 37, 3), seed=1)
    assert rel_diff(labeler(jnp.asarray(x)), torch_features(net, x)) <= 1e-5
    np.testing.assert_array_equal(sd["classifier.weight"].numpy()[:, :, 0, 0],
                                  np.asarray(labeler.classifier.weight).T)


def test_export_default_path_is_in_the_workdir(stage1_run, capsys):
    workdir, _ = stage1_run
    assert cli.main(["export-torch", "--workdir", str(workdir)]) == 0
    assert (workdir / "labeler.pth").is_file()
    assert "strict=True" in capsys.readouterr().out
    (workdir / "labeler.pth").unlink()


def test_export_deeplab_v1_workdir(tmp_path):
    config = tiny_config("stage3")
    model = randomised(lambda: models.DeepLab("tiny", NUM_CLASSES, rngs=nnx.Rngs(0)), seed=2)
    save_trained_deeplab(model, config, tmp_path)
    path, module = export_torch.export(tmp_path)
    assert path == tmp_path / "vgg_tiny.pth" and "LargeFOV" in module
    net = ref.DeepLabV1Ref(NUM_CLASSES, TINY, TINY_FC)
    net.load_state_dict(torch.load(path, weights_only=True), strict=True)
    net.eval()
    x = images((1, 33, 35, 3), seed=3)
    features, _ = model(jnp.asarray(x))
    assert rel_diff(features, torch_features(net, x)) <= 1e-5


def test_export_deeplab_v2_state_dict_has_batchnorm_counters(tmp_path):
    """DeepLab-ASPP's BatchNorms: `strict=True` also wants `num_batches_tracked`."""
    small = dict(resnet_blocks=(1, 1, 1, 1), resnet_base_width=8, aspp_dim=8)
    model = randomised(lambda: models.DeepLab("v2", 3, rngs=nnx.Rngs(0), **small), seed=4)
    path = export_torch.write_state_dict(export_torch.official_state_dict(model), tmp_path / "v2.pth")
    sd = torch.load(path, weights_only=True)
    assert sum(k.endswith("num_batches_tracked") for k in sd) == sum(k.endswith("running_mean") for k in sd) > 0
    net = ref.DeepLabV2Ref(3, n_blocks=(1, 1, 1, 1), base=8, aspp_dim=8)
    net.load_state_dict(sd, strict=True)
    net.eval()
    x = images((1, 29, 31, 3), seed=5)
    features, _ = model(jnp.asarray(x))
    assert rel_diff(features, torch_features(net, x)) <= 1e-5


def write_json(path, obj):
    import json

    path.write_text(json.dumps(obj))


@pytest.mark.parametrize("case, message", [
    ("missing", "no such directory"),
    ("empty", "holds no trained network"),
    ("labeler_json_only", "no trained weights"),
    ("deeplab_json_only", "no trained weights"),
    ("efficientnet", "model.name='efficientnet_lite0_labeler' has no official PyTorch module"),
    ("batchnorm", "model.vgg_norm='batch'"),
    ("dilation", "fc6 has dilation 1"),
])
def test_export_errors_are_clear(tmp_path, capsys, case, message):
    workdir = tmp_path / "run"
    if case != "missing":
        workdir.mkdir()
    model = {"name": "vgg16_labeler", "vgg_norm": "none", "fc6_dilation": 1}
    if case == "deeplab_json_only":
        write_json(workdir / "model.json", {"format": 1, "kind": "deeplab", "model": {"name": "deeplab_v1"}})
    elif case != "missing" and case != "empty":
        model.update({"efficientnet": {"name": "efficientnet_lite0_labeler"}, "batchnorm": {"vgg_norm": "batch"},
                      "dilation": {"fc6_dilation": 12}}.get(case, {}))
        write_json(workdir / "model.json", {"format": 1, "kind": "labeler", "model": model})
        if case != "labeler_json_only":
            (workdir / "model").mkdir()
    assert cli.main(["export-torch", f"--workdir={workdir}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bana export-torch: error:") and message in err
    assert not list(tmp_path.rglob("*.pth"))


# ------------------------------------------------------------------------------------------------
# bana stage2 --config.pseudo.labeler=FILE.pth


def stage2_config(tmp_path, **pseudo):
    config = base_config()
    config.model.num_classes = NUM_CLASSES
    config.data.name = "synthetic"
    config.data.synthetic_images, config.data.synthetic_size = 3, SIZE
    config.pseudo.split = "val"
    config.pseudo.update(pseudo)
    config.train.compilation_cache, config.train.progress_bar = "", False
    return config


def test_stage2_from_an_official_state_dict_equals_the_workdir(stage1_run, tmp_path):
    workdir, _ = stage1_run
    pth = export_torch.export(workdir, tmp_path / "ClsNet.pt")[0]
    from_workdir = stage2.main(stage2_config(tmp_path, stage1_workdir=str(workdir)), tmp_path / "a")
    from_pth = stage2.main(stage2_config(tmp_path, labeler=str(pth)), tmp_path / "b")
    assert from_workdir["images"] == from_pth["images"] == 3
    val = SyntheticSource(num_images=3, image_size=SIZE, num_classes=NUM_CLASSES - 1, seed=1)
    for i in range(3):
        for kind in ("Y_crf", "Y_ret"):
            a, b = (tmp_path / run / "pseudo_labels" / kind / f"{val[i]['id']}.png" for run in ("a", "b"))
            assert a.read_bytes() == b.read_bytes(), (kind, i)
    assert from_pth["miou"] == from_workdir["miou"]


def test_stage2_names_the_keys_that_do_not_match(stage1_run, tmp_path):
    workdir, _ = stage1_run
    sd = export_torch.official_state_dict(stage2.load_official_labeler(
        export_torch.export(workdir, tmp_path / "good.pth")[0]))
    sd.pop("backbone.fc7.bias")
    sd["backbone.fc8.weight"] = np.zeros((2, 2), np.float32)
    bad = export_torch.write_state_dict(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"pseudo.labeler=.*bad.pth.*not an official Labeler state dict.*"
                                         r"missing keys \['backbone.fc7.bias'\].*unused keys \['backbone.fc8.weight'\]"):
        stage2.main(stage2_config(tmp_path, labeler=str(bad)), tmp_path / "w")
    v2 = export_torch.write_state_dict({"c1.weight": np.zeros((2, 2, 3, 3), np.float32)}, tmp_path / "v2.pth")
    with pytest.raises(ValueError, match=r"lacks \['backbone.conv1_1.weight'"):
        stage2.load_official_labeler(v2)
    with pytest.raises(FileNotFoundError, match="no such file"):
        stage2.load_official_labeler(tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="exactly one of"):
        stage2.main(stage2_config(tmp_path, labeler=str(bad), stage1_workdir=str(workdir)), tmp_path / "w")
