"""Where a model's forward pass runs: TensorFlow, or OpenVINO on a CPU.

The Keras model (collection/models.py) stays the source of truth: its weights
load as always, and for OpenVINO the same traced function that TensorFlow runs
is converted once with ``openvino.convert_model``. The converted model (OpenVINO
IR, an .xml beside a .bin) is cached next to the converted-weights cache, under
a name keyed by model, weights, precision and OpenVINO version, so a later start
skips the conversion and a new OpenVINO release converts afresh. The weights are
known by their file's digest (models.Model.weights_key), so a start that finds its
IR cached never imports TensorFlow: `collection add` of one file took 8.2 s, mostly
TensorFlow's import and the Keras build, and takes 1.7 (bench/startup.py).

Neither TensorFlow nor OpenVINO is imported here until a model is built, and
TensorFlow not even then when the machine has no GPU device it could use.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import secrets
import sys
import threading
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

AUTO = "auto"
TENSORFLOW = "tensorflow"
OPENVINO = "openvino"
RUNTIMES = (AUTO, TENSORFLOW, OPENVINO)

# Bump when the converted function changes in a way the weights key does not show: the
# input normalisation, the outputs, the architecture, or how a checkpoint's weights are
# converted (efficientnet.py), so that IR converted by older code is not reused. (The
# key is the weights file's digest, not the loaded weights: a cached IR is found without
# building the model.)
IR_FORMAT = 1

# OpenVINO's own name for each precision the collection records.
_INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16"}

# What TensorFlow and OpenVINO give against TensorFlow fp32, measured by
# `bench/ingest.py --count 200` on 200 files made from the real photos, with the real
# EfficientNet-Lite0 weights: (top-1 label agreement, mean overlap of the 10 nearest
# neighbours, lowest cosine between the two vectors of one image). README: Runtimes.
# The same to the third decimal on an AMD EPYC (avx512_bf16) and an Intel Xeon with AMX;
# these are the Xeon's. int8 (NNCF, bench only) gave 0.925 / 0.970 / 0.933: not offered.
AGREEMENT: dict[tuple[str, str], tuple[float, float, float]] = {
    (TENSORFLOW, "fp32"): (1.0, 1.0, 1.0),
    (OPENVINO, "fp32"): (1.0, 1.0, 0.99999),
    (TENSORFLOW, "bf16"): (0.985, 0.989, 0.99632),
    (OPENVINO, "bf16"): (0.970, 0.990, 0.99185),
}
# Below either bar a precision may be chosen, never be the default.
DEFAULT_BARS = (0.99, 0.95)  # top-1 agreement, 10-NN overlap

Forward = Callable[[np.ndarray], Sequence[np.ndarray]]


class RuntimeUnavailable(Exception):
    """OpenVINO cannot run the model here; the message says why, in one line."""


def tensorflow_gpus() -> list:
    import tensorflow as tf

    return tf.config.list_physical_devices("GPU")


def gpu_device_present() -> bool:
    """Whether this machine has a device TensorFlow could run on, looked for without
    importing TensorFlow (seconds): an NVIDIA (/dev/nvidia0...), ROCm (/dev/kfd) or WSL
    (/dev/dxg) device on Linux, the tensorflow-metal plugin on macOS; elsewhere, True
    (TensorFlow is asked)."""
    if sys.platform.startswith("linux"):
        dev = Path("/dev")
        return any(dev.glob("nvidia[0-9]*")) or (dev / "kfd").exists() or (dev / "dxg").exists()
    if sys.platform == "darwin":
        return installed("tensorflow-metal") is not None
    return True


def visible_gpus() -> list:
    """The GPUs TensorFlow sees, importing it only where one may be there."""
    return tensorflow_gpus() if gpu_device_present() else []


def installed(distribution: str) -> str | None:
    """The installed version of a package, read from its metadata (nothing imported)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def openvino_version() -> str:
    """The installed OpenVINO's version; RuntimeUnavailable when it does not import."""
    try:
        import openvino
    except Exception as e:  # ImportError, or a shared library that fails to load
        raise RuntimeUnavailable(f"OpenVINO does not load here ({type(e).__name__}: {e})") from None
    return openvino.get_version().split("-")[0]


def resolve(requested: str, gpus: Callable[[], list] = visible_gpus) -> tuple[str, str | None]:
    """The runtime to use, and a line to tell the user when it is not the one asked for.

    auto: TensorFlow when it sees a GPU, else OpenVINO when it imports, else TensorFlow."""
    if requested not in RUNTIMES:
        raise ValueError(f"unknown runtime {requested!r}: choose one of {', '.join(RUNTIMES)}")
    if requested == TENSORFLOW or (requested == AUTO and gpus()):
        return TENSORFLOW, None
    try:
        openvino_version()
    except RuntimeUnavailable as e:
        return TENSORFLOW, f"{e}: running the model with TensorFlow instead."
    return OPENVINO, None


def version(runtime: str) -> str:
    """``runtime`` with its installed version, as recorded in ``ingest_log``."""
    if runtime == OPENVINO:
        return f"{OPENVINO} {openvino_version()}"
    import tensorflow as tf

    return f"{TENSORFLOW} {tf.__version__}"


def tensorflow_forward(traced) -> Forward:
    """The traced tf.function itself, returning numpy arrays."""
    return lambda batch: [t.numpy() for t in traced(batch)]


def openvino_forward(
    path: Path, traced: Callable[[], object], model_id: str, precision: str, batch_size: int = 16
) -> Forward:
    """The cached IR at ``path`` (or ``traced()``, converted and cached there, when it is
    missing or unreadable) compiled for the CPU.

    ``traced`` gives the traced function, building the Keras model: called only for a
    conversion. Compiled as ``compile_forward`` says. Raises RuntimeUnavailable with one
    line when OpenVINO cannot convert or compile it."""
    import openvino as ov

    core = ov.Core()
    converted = None
    if path.is_file():
        try:
            converted = core.read_model(path)
        except Exception:
            converted = None  # a corrupt cache entry: convert again and replace it
    if converted is None:
        try:
            converted = convert(traced())
        except Exception as e:
            raise RuntimeUnavailable(f"OpenVINO could not convert {model_id} ({type(e).__name__}: {e})") from None
        save(converted, path)
    return compile_forward(converted, model_id, precision, batch_size)


def compile_forward(converted, model_id: str, precision: str, batch_size: int = 16) -> Forward:
    """An OpenVINO model compiled for the CPU at ``precision``, as a forward function.

    Compiled for a static shape: ``batch_size`` split between the streams, each of its
    requests taking a fixed slice (a short last slice goes to a second, batch-free
    compilation). On 2 cores, batch 16: 5.5 core-ms per image against 6.2 with the
    converted model's dynamic batch."""
    import openvino as ov

    core = ov.Core()
    # Streams of one or few threads each, every stream taking a slice of the batch: no
    # thread waits on another, which matters when decoding threads share the cores
    # (pinning off for the same reason). On 2 busy shared cores, batch 16: 17-18
    # images/s against 14-16 for one stream on both cores.
    streams = max(1, min(os.cpu_count() or 1, batch_size))
    per_request = -(-batch_size // streams)
    hint = _INFERENCE_PRECISION[precision]
    try:
        # A slice short of per_request (a search's one image, a watcher's single file,
        # a batch's remainder) runs at its own size on a second compilation of the
        # batch-free shape, all cores on it: padded to the static slice, one image cost
        # as much as eight (90-100 ms against 7 ms for EfficientNet-Lite0 on 2 cores).
        partial = core.compile_model(
            converted.clone(),
            "CPU",
            {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False},
        )
        image_shape = [d.get_length() for d in list(converted.input(0).get_partial_shape())[1:]]
        converted.reshape([per_request, *image_shape])
        compiled = core.compile_model(
            converted,
            "CPU",
            {
                # Explicit: on CPUs with bf16 support OpenVINO would otherwise pick bf16 itself.
                "INFERENCE_PRECISION_HINT": hint,
                "PERFORMANCE_HINT": "THROUGHPUT",
                "NUM_STREAMS": streams,
                "ENABLE_CPU_PINNING": False,
            },
        )
        requests = [compiled.create_infer_request() for _ in range(streams)]
        partial_request = partial.create_infer_request()
        applied = {compiled_precision(compiled), compiled_precision(partial)}
    except Exception as e:
        raise RuntimeUnavailable(f"OpenVINO could not compile {model_id} ({type(e).__name__}: {e})") from None
    if applied != {hint}:
        # A CPU plugin that ignored the hint (on AMX machines its default is bf16) would
        # give vectors of another precision under this one's name.
        raise RuntimeUnavailable(
            f"OpenVINO compiled {model_id} at {', '.join(sorted(applied - {hint}))}, not the {hint} asked for"
        )
    outputs = range(len(compiled.outputs))
    lock = threading.Lock()  # the requests' output buffers are reused by the next call

    def forward(batch: np.ndarray) -> list[np.ndarray]:
        slices = [batch[i : i + per_request] for i in range(0, len(batch), per_request)]
        results: list[list[np.ndarray]] = [[] for _ in outputs]
        with lock:
            for wave in range(0, len(slices), len(requests)):
                busy = []
                for request, part in zip(requests, slices[wave : wave + len(requests)]):
                    if len(part) < per_request:  # only the last slice can be short
                        request = partial_request
                    request.start_async([np.ascontiguousarray(part)])
                    busy.append((request, part))
                for request, part in busy:
                    request.wait()
                    for i in outputs:
                        results[i].append(request.get_output_tensor(i).data[: len(part)].copy())
        return [np.concatenate(r) for r in results]

    forward.precision = hint  # what OpenVINO computes in, as it reports it
    forward.partial_request = partial_request  # the short slices' request (tests look at its input)
    return forward


def compiled_precision(compiled) -> str:
    """The precision a compiled OpenVINO model really computes in: "f32", "bf16", ..."""
    return str(compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name())


def convert(traced):
    """The traced tf.function as an OpenVINO model (seconds: done once per cache key)."""
    import openvino as ov

    return ov.convert_model(traced)


def save(converted, path: Path) -> None:
    """Write the IR atomically: both files under temporary names, then os.replace,
    the .bin before the .xml that names it, so a reader never finds half of one.
    An unwritable cache only costs the next start a conversion."""
    import openvino as ov

    tmp = path.with_name(f".{os.getpid()}.{secrets.token_hex(4)}.{path.name}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # compress_to_fp16=False: the default would halve the weights to fp16 and change the vectors.
        ov.save_model(converted, tmp, compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(tmp, path)
    except Exception:
        pass
    finally:
        for leftover in (tmp, tmp.with_suffix(".bin")):
            if leftover.exists():
                leftover.unlink()


def cache_dir() -> Path:
    """Converted models, beside the converted-weights cache (env COLLECTION_CACHE)."""
    from .efficientnet import default_cache_dir

    return default_cache_dir() / "openvino"


def ir_path(directory: Path, model_id: str, weights_key: str, precision: str, ov_version: str) -> Path:
    """The cached IR's .xml: a readable name, and a digest of everything it depends on."""
    key = f"{model_id}|{weights_key}|{precision}|{ov_version}|{IR_FORMAT}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    name = f"{model_id.replace(':', '-')}.{precision}.openvino-{ov_version}.{digest}.xml"
    return Path(directory) / name


def weights_digest(keras_model) -> str:
    """A hash of the loaded weights, their shapes and order: the identity of what is
    converted, whatever file, checkpoint or seed they came from (about 0.1 s for
    Inception v3's 95 MB). For weights whose file is not known before the build."""
    h = hashlib.sha256()
    # Not the variables' names: Keras numbers them per process, so they vary.
    for w in keras_model.weights:
        value = np.ascontiguousarray(np.asarray(w))
        h.update(f"{value.dtype}:{value.shape};".encode())
        h.update(value.tobytes())
    return h.hexdigest()
