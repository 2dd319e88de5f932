"""Checkpoint I/O: torch files read without torch, orbax round trip."""

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
import torch_reference as ref  # noqa: E402

from bana_jax.models import DeepLab  # noqa: E402
from bana_jax.models.checkpoint import load_params, save_params  # noqa: E402
from bana_jax.models.torch_import import load_checkpoint, torch_state_dict  # noqa: E402
from bana_jax.models.torch_io import read_state_dict, read_torch_file_numpy  # noqa: E402


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


def test_orbax_round_trip(tmp_path):
    net = ref.randomise_(ref.DeepLabV2Ref(3, n_blocks=(1, 1, 1, 1), base=8, aspp_dim=8), seed=4)
    factory = lambda: DeepLab("v2", 3, resnet_blocks=(1, 1, 1, 1), resnet_base_width=8, aspp_dim=8,  # noqa: E731
                              rngs=nnx.Rngs(0))
    model = nnx.eval_shape(factory)
    load_checkpoint(model, net.state_dict())
    save_params(model, tmp_path / "ckpt")
    save_params(model, tmp_path / "ckpt")  # overwriting is allowed
    restored = load_params(nnx.eval_shape(factory), tmp_path / "ckpt")
    ours, back = torch_state_dict(model), torch_state_dict(restored)
    assert ours.keys() == back.keys()
    for key in ours:
        np.testing.assert_array_equal(back[key], ours[key], err_msg=key)
    with pytest.raises(FileNotFoundError):
        load_params(model, tmp_path / "missing")


@pytest.mark.parametrize("arch", ["labeler", "deeplab_v2"])
def test_compare_torch_cli(tmp_path, capsys, arch):
    from bana_jax import compare_torch

    if arch == "labeler":
        net = ref.randomise_(ref.LabelerRef(5, (8, 16, 32, 32, 32), 64), seed=5)
    else:
        net = ref.randomise_(ref.DeepLabV2Ref(5, n_blocks=(1, 2, 1, 1), base=8, aspp_dim=8), seed=6)
    torch.save(net.state_dict(), tmp_path / "net.pt")
    rc = compare_torch.main(["--arch", arch, "--checkpoint", str(tmp_path / "net.pt"), "--size", "27", "30"])
    out = capsys.readouterr().out
    assert rc == 0, out
    stages = ["pool1", "pool5", "fc7", "scores"] if arch == "labeler" else ["layer1", "layer5", "aspp", "scores"]
    for stage in stages:
        assert stage in out
    assert "OK" in out
    # A checkpoint of the wrong architecture fails loudly.
    with pytest.raises(ValueError, match="no key"):
        compare_torch.main(["--arch", "deeplab_v2" if arch == "labeler" else "labeler",
                            "--checkpoint", str(tmp_path / "net.pt")])
