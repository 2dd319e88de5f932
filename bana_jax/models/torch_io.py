"""Read PyTorch `.pt` / `.pth` state dicts into `{key: np.ndarray}`, with or without torch.

Without torch, both serialisations are decoded with a restricted unpickler that only builds
tensors, ordered dicts and plain containers (no arbitrary code runs):
- zip format (torch >= 1.6 default): `<root>/data.pkl` + one raw file per storage;
- legacy format (`_use_new_zipfile_serialization=False`, e.g. the EfficientNet-Lite0 weights):
  magic / protocol / sys-info pickles, the object pickle, the storage-key list, then each
  storage as an int64 element count followed by its raw bytes.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)


class _Storage:
    """A flat buffer; `data` is filled when the bytes are read (legacy format: after the pickle)."""

    def __init__(self, dtype: np.dtype, numel: int):
        self.dtype, self.numel, self.data = dtype, numel, None


class _LazyTensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def materialise(self) -> np.ndarray:
        flat = self.storage.data
        if flat is None:
            raise ValueError("tensor storage was never read: truncated or unsupported file")
        itemsize = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset:], shape=self.size, strides=[s * itemsize for s in self.stride])
        return np.array(view)  # own the memory, contiguous


def _rebuild_tensor(storage, offset, size, stride, *unused):
    return _LazyTensor(storage, offset, size, stride)


def _rebuild_parameter(data, *unused):
    return data


class _Unpickler(pickle.Unpickler):
    """Allows only what a state dict needs; everything else is an error."""

    def __init__(self, file, load_storage):
        super().__init__(file)
        self._load_storage = load_storage

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name in ("float32", "float64", "float16", "int64", "int32", "uint8", "bool"):
            return _StorageType(np.dtype(name if name != "bool" else np.bool_))
        if module == "torch" and name == "bfloat16":
            return _StorageType(ml_dtypes.bfloat16)
        raise pickle.UnpicklingError(f"unsupported object in checkpoint: {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        return self._load_storage(pid)


def _resolve(obj: Any) -> Any:
    if isinstance(obj, _LazyTensor):
        return obj.materialise()
    if isinstance(obj, dict):
        return type(obj)((k, _resolve(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v) for v in obj)
    return obj


def _read_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise ValueError(f"{path}: zip checkpoint without data.pkl")
        root = pkl[: -len("data.pkl")]

        def load_storage(pid):
            _, storage_type, key, _location, numel = pid[:5]
            raw = archive.read(f"{root}data/{key}")
            storage = _Storage(storage_type.dtype, numel)
            storage.data = np.frombuffer(raw, dtype=storage_type.dtype.newbyteorder("<"))
            return storage

        obj = _Unpickler(io.BytesIO(archive.read(pkl)), load_storage).load()
    return _resolve(obj)


def _read_legacy(path: str) -> Any:
    storages: dict[str, _Storage] = {}

    def load_storage(pid):
        _, storage_type, key, _location, numel = pid[:5]
        if len(pid) > 5 and pid[5] is not None:
            raise pickle.UnpicklingError("legacy storage views are not supported")
        if key not in storages:
            storages[key] = _Storage(storage_type.dtype, numel)
        return storages[key]

    with open(path, "rb") as f:
        if pickle.load(f) != _LEGACY_MAGIC:
            raise ValueError(f"{path}: not a PyTorch checkpoint (bad magic number)")
        pickle.load(f)  # protocol version
        pickle.load(f)  # sys info (endianness, type sizes)
        obj = _Unpickler(f, load_storage).load()
        keys = pickle.load(f)
        for key in keys:
            (numel,) = struct.unpack("<q", f.read(8))
            storage = storages[key]
            nbytes = numel * storage.dtype.itemsize
            storage.data = np.frombuffer(f.read(nbytes), dtype=storage.dtype.newbyteorder("<"))
            if storage.data.size != numel:
                raise ValueError(f"{path}: truncated storage {key}")
    return _resolve(obj)


def read_torch_file_numpy(path: str | os.PathLike) -> Any:
    """Decode a torch checkpoint without torch (tensors become NumPy arrays)."""
    path = os.fspath(path)
    return _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path)


def to_numpy_state_dict(obj: Any) -> dict[str, np.ndarray]:
    """A mapping of tensors/arrays -> `{key: np.ndarray}`; unwraps a `{'state_dict': ...}`."""
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise TypeError(f"state dict must be a mapping of name -> tensor, got {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if hasattr(value, "detach"):  # torch.Tensor
            value = value.detach().cpu().float().numpy() if value.is_floating_point() \
                else value.detach().cpu().numpy()
        out[str(key)] = np.asarray(value)
    return out


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """`{key: np.ndarray}` from a `.pt`/`.pth` file; uses torch when installed."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return to_numpy_state_dict(read_torch_file_numpy(path))
    return to_numpy_state_dict(torch.load(path, map_location="cpu", weights_only=True))
