from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from collection import models, runtimes
from collection.cli import cli
from collection.store import Store
from conftest import sample_photos


@pytest.fixture
def ir_cache(tmp_path, monkeypatch):
    """Converted models go to a fresh folder; conversions are counted."""
    folder = tmp_path / "openvino"
    monkeypatch.setattr(runtimes, "cache_dir", lambda: folder)
    converted = []
    convert = runtimes.convert
    monkeypatch.setattr(runtimes, "convert", lambda traced: converted.append(1) or convert(traced))
    return folder, converted


@pytest.fixture
def no_openvino(monkeypatch):
    """As on a machine where OpenVINO is not installed or its libraries do not load."""
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError


def test_openvino_gives_tensorflows_labels_and_vectors(ir_cache):
    """The real EfficientNet-Lite0 weights on the photos shipped with scikit-image and scikit-learn."""
    photos = [Image.fromarray(a).convert("RGB") for a in sample_photos().values()]
    tf = models.get_model("efficientnet_lite0", runtime="tensorflow").load()
    ov = models.get_model("efficientnet_lite0", runtime="openvino").load()
    assert (tf.runtime, ov.runtime) == ("tensorflow", "openvino")
    assert ov.runtime_version.startswith("openvino 20")
    tf_vectors, tf_probs = tf.embed_batch(photos)
    ov_vectors, ov_probs = ov.embed_batch(photos)
    assert ov_vectors.dtype == np.dtype("<f4") and ov_vectors.shape == tf_vectors.shape
    assert np.min(np.sum(tf_vectors * ov_vectors, axis=1)) >= 0.9999
    assert [t[0][1] for t in tf.top_labels(tf_probs)] == [t[0][1] for t in ov.top_labels(ov_probs)]
    assert ov.top_labels(ov_probs)[0][0][1] in ("tabby", "tiger_cat", "Egyptian_cat")  # chelsea, the cat
    assert ov.embed_batch([])[0].shape == (0, 1280)


def test_the_converted_model_is_cached_and_reused(ir_cache):
    folder, converted = ir_cache
    image = np.full((224, 224, 3), 90, np.uint8)
    first = models.get_model("efficientnet_lite0:random", runtime="openvino").load()
    assert converted == [1]
    files = sorted(p.name for p in folder.iterdir())
    assert len(files) == 2 and files[0].endswith(".bin") and files[1].endswith(".xml")
    assert "efficientnet_lite0-random.fp32.openvino-" in files[1]
    again = models.get_model("efficientnet_lite0:random", runtime="openvino").load()
    assert converted == [1]  # read from the cache, not converted again
    assert sorted(p.name for p in folder.iterdir()) == files
    assert np.allclose(first.embed_batch([image])[0], again.embed_batch([image])[0], atol=1e-6)
    # Other weights, another entry: the key is the weights, not the model's name.
    models.EfficientNetLite0(weights=models.RANDOM, seed=1, runtime="openvino").load()
    assert converted == [1, 1] and len(list(folder.glob("*.xml"))) == 2


def test_a_new_openvino_version_converts_again(ir_cache, monkeypatch):
    folder, converted = ir_cache
    models.get_model("efficientnet_lite0:random", runtime="openvino").load()
    monkeypatch.setattr(runtimes, "openvino_version", lambda: "2099.1.0")
    model = models.get_model("efficientnet_lite0:random", runtime="openvino").load()
    assert converted == [1, 1]
    assert model.runtime_version == "openvino 2099.1.0"
    assert len(list(folder.glob("*.openvino-2099.1.0.*.xml"))) == 1
    assert len(list(folder.glob("*.xml"))) == 2


def test_a_corrupt_cache_entry_is_converted_again(ir_cache):
    folder, converted = ir_cache
    models.get_model("efficientnet_lite0:random", runtime="openvino").load()
    (xml,) = folder.glob("*.xml")
    xml.write_text("<not a model")
    model = models.get_model("efficientnet_lite0:random", runtime="openvino").load()
    assert converted == [1, 1] and model.runtime == "openvino"
    assert xml.read_text().startswith("<?xml")
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary files left


# A start in a fresh interpreter: the model loaded as `collection add` loads it, one
# image embedded, and what was imported on the way.
_START = """
import json, sys
import numpy as np
from collection import models, runtimes
runtime = "openvino" if runtimes.gpu_device_present() else "auto"
model = models.get_model("efficientnet_lite0:random", runtime=runtime).load()
vectors, _ = model.embed_batch([np.full((224, 224, 3), 90, np.uint8)])
print(json.dumps({"runtime": model.runtime, "tensorflow": "tensorflow" in sys.modules,
                  "keras_model": model.keras_model is not None, "vector": vectors[0].tolist()}))
"""


def test_a_start_that_finds_its_conversion_cached_never_imports_tensorflow(tmp_path):
    env = {**os.environ, "COLLECTION_CACHE": str(tmp_path)}

    def start() -> dict:
        out = subprocess.run([sys.executable, "-c", _START], env=env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    first, second = start(), start()
    assert first["runtime"] == second["runtime"] == "openvino"
    assert first["tensorflow"] and first["keras_model"]  # the first start converts, through Keras
    assert not second["tensorflow"] and not second["keras_model"]
    assert np.allclose(first["vector"], second["vector"], atol=1e-6)


def test_the_weights_key_is_the_weights_file_and_the_versions_that_load_it(tmp_path):
    weights = tmp_path / "inception.h5"
    model = models.InceptionV3(weights=str(weights), runtime="openvino")
    assert model.weights_key() is None  # no file: the build says what is wrong
    weights.write_bytes(b"first weights")
    first = model.weights_key()
    assert first.startswith("sha256 ") and "tensorflow " in first and "keras " in first
    assert model.weights_key() == first
    weights.write_bytes(b"other weights")
    assert model.weights_key() != first
    seeded = [models.EfficientNetLite0(weights=models.RANDOM, seed=s).weights_key() for s in (0, 0, 1)]
    assert seeded[0] == seeded[1] != seeded[2]


def test_gpus_are_asked_of_tensorflow_only_where_a_device_is_there(monkeypatch):
    def tensorflow_gpus():
        asked.append(1)
        return ["/physical_device:GPU:0"]

    asked = []
    monkeypatch.setattr(runtimes, "tensorflow_gpus", tensorflow_gpus)
    monkeypatch.setattr(runtimes, "gpu_device_present", lambda: False)
    assert runtimes.visible_gpus() == [] and asked == []
    monkeypatch.setattr(runtimes, "gpu_device_present", lambda: True)
    assert runtimes.visible_gpus() == ["/physical_device:GPU:0"] and asked == [1]


def test_auto_picks_tensorflow_on_a_gpu_else_openvino():
    assert runtimes.resolve("auto", gpus=lambda: ["/physical_device:GPU:0"]) == ("tensorflow", None)
    assert runtimes.resolve("auto", gpus=lambda: []) == ("openvino", None)
    assert runtimes.resolve("openvino", gpus=lambda: ["/physical_device:GPU:0"]) == ("openvino", None)
    asked = []
    assert runtimes.resolve("tensorflow", gpus=lambda: asked.append(1) or []) == ("tensorflow", None)
    assert asked == []
    with pytest.raises(ValueError):
        runtimes.resolve("onnx")


def test_auto_falls_back_to_tensorflow_without_openvino(no_openvino):
    for asked in ("auto", "openvino"):
        runtime, note = runtimes.resolve(asked, gpus=lambda: [])
        assert runtime == "tensorflow"
        assert note.startswith("OpenVINO does not load here (") and "\n" not in note


def test_a_model_falls_back_cleanly_when_openvino_cannot_load(no_openvino):
    said = []
    model = models.get_model("efficientnet_lite0:random", runtime="openvino").load(echo=said.append)
    assert model.runtime == "tensorflow" and len(said) == 1 and "TensorFlow" in said[0]
    vectors, _ = model.embed_batch([np.full((224, 224, 3), 90, np.uint8)])
    assert vectors.shape == (1, 1280)


def test_a_model_falls_back_when_conversion_fails(ir_cache, monkeypatch):
    def broken(traced):
        raise RuntimeError("unsupported operation")

    monkeypatch.setattr(runtimes, "convert", broken)
    said = []
    model = models.get_model("efficientnet_lite0:random", runtime="openvino", precision="bf16").load(echo=said.append)
    assert model.runtime == "tensorflow" and model.precision == "bf16"
    assert said == [
        "OpenVINO could not convert efficientnet_lite0:random (RuntimeError: unsupported operation): "
        "running the model with TensorFlow instead."
    ]
    assert model.keras_model.dtype_policy.name == "mixed_bfloat16"  # TensorFlow applies the precision


def test_a_short_batch_runs_at_its_own_size_and_agrees_with_a_full_one(ir_cache, monkeypatch):
    """A search's single image is not padded to a stream's slice (it cost as much as 8)."""
    monkeypatch.setattr(runtimes.os, "cpu_count", lambda: 2)  # 2 streams of 8 images
    model = models.get_model("efficientnet_lite0:random", runtime="openvino").load()
    photos = [np.asarray(Image.fromarray(a).convert("RGB").resize((224, 224))) for a in sample_photos().values()]
    batch = [photos[i % len(photos)] for i in range(19)]  # two full slices and a short one of 3
    single, _ = model.embed_batch(batch[:1])
    assert list(model._infer.partial_request.get_input_tensor(0).shape) == [1, 224, 224, 3]
    whole, probs = model.embed_batch(batch)
    assert list(model._infer.partial_request.get_input_tensor(0).shape) == [3, 224, 224, 3]
    assert whole.shape == (19, 1280) and probs.shape == (19, 1000)
    assert np.allclose(single[0], whole[0], atol=1e-5)
    assert np.allclose(whole[16], whole[16 % len(photos)], atol=1e-5)  # the short slice agrees with a full one's


def test_openvino_computes_at_the_precision_asked_for(ir_cache):
    """On CPUs with AMX (or avx512_bf16) OpenVINO's own default is bf16: fp32 must stay f32."""
    f32 = models.get_model("efficientnet_lite0:random", runtime="openvino").load()
    bf16 = models.get_model("efficientnet_lite0:random", runtime="openvino", precision="bf16").load()
    assert f32._infer.precision == "f32"
    assert bf16._infer.precision == "bf16"


def test_a_model_falls_back_when_openvino_ignores_the_precision(ir_cache, monkeypatch):
    monkeypatch.setattr(runtimes, "compiled_precision", lambda compiled: "bf16")
    said = []
    model = models.get_model("efficientnet_lite0:random", runtime="openvino").load(echo=said.append)
    assert model.runtime == "tensorflow" and model.precision == "fp32"
    assert said == [
        "OpenVINO compiled efficientnet_lite0:random at bf16, not the f32 asked for: "
        "running the model with TensorFlow instead."
    ]


def test_openvino_bf16_is_close_to_fp32_but_recorded_apart(ir_cache, tmp_path):
    image = np.asarray(Image.fromarray(sample_photos()["chelsea"]).resize((224, 224)))
    f32 = models.get_model("efficientnet_lite0:random", runtime="openvino").load()
    bf16 = models.get_model("efficientnet_lite0:random", runtime="openvino", precision="bf16").load()
    cosine = float(np.dot(f32.embed_batch([image])[0][0], bf16.embed_batch([image])[0][0]))
    assert 0.95 < cosine < 1.0
    store = Store(tmp_path / "c.db")
    store.claim_model(f32.model_id, f32.dimensions, f32.precision)
    with pytest.raises(Exception, match="bf16"):
        store.claim_model(bf16.model_id, bf16.dimensions, bf16.precision)


def test_add_records_the_runtime_in_ingest_log(tmp_path, ir_cache, images_dir):
    from conftest import make_image

    for i in range(3):
        make_image(images_dir / f"{i}.jpg", seed=i)
    db = tmp_path / "c.db"
    runner = CliRunner()
    for runtime in ("openvino", "tensorflow"):  # fp32 from both may share a collection
        make_image(images_dir / f"{runtime}.png", seed=7 if runtime == "openvino" else 8)
        result = runner.invoke(
            cli, ["add", str(images_dir), "--db", str(db), "--model", "efficientnet_lite0:random", "--runtime", runtime]
        )
        assert result.exit_code == 0, result.output
    rows = list(Store(db).db.execute("select source, added, runtime from ingest_log order by id"))
    assert [r[0] for r in rows] == ["add", "add"] and [r[1] for r in rows] == [4, 1]
    assert rows[0][2].startswith("openvino ") and rows[1][2].startswith("tensorflow ")
