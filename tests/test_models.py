from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from collection import models
from conftest import sample_photos


@pytest.fixture(scope="module")
def inception():
    """The real Inception v3 architecture with seeded random weights: nothing is downloaded."""
    return models.get_model("inception_v3:random").load()


def test_one_forward_pass_gives_vector_and_probabilities(inception):
    photos = sample_photos()
    batch = [inception.prepare(_pil(photos[name])) for name in ("chelsea", "coffee", "rocket")]
    assert batch[0].shape == (299, 299, 3) and batch[0].dtype == np.uint8
    vectors, probs = inception.embed_batch(batch)
    assert vectors.shape == (3, 2048) and vectors.dtype == np.dtype("<f4")
    assert probs.shape == (3, 1000) and probs.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert not np.allclose(vectors[0], vectors[1])  # different photos, different vectors


def test_batching_does_not_change_results(inception):
    photos = sample_photos()
    batch = [inception.prepare(_pil(photos[name])) for name in ("chelsea", "coffee")]
    together, _ = inception.embed_batch(batch)
    alone, _ = inception.embed_batch(batch[1:])
    assert np.allclose(together[1], alone[0], atol=1e-4)


def test_same_seed_same_weights():
    a = models.get_model("efficientnet_lite0:random").load()
    b = models.get_model("efficientnet_lite0:random").load()
    image = np.full((224, 224, 3), 128, np.uint8)
    assert np.allclose(a.embed_batch([image])[0], b.embed_batch([image])[0], atol=1e-6)


def test_top_labels_are_imagenet_classes(inception):
    names = inception.class_names()
    assert len(names) == 1000
    assert names[281] == ("n02123045", "tabby")
    probs = np.zeros((1, 1000), np.float32)
    probs[0, [281, 1, 7]] = [0.6, 0.3, 0.1]
    top = inception.top_labels(probs, k=3)[0]
    assert [label for _, label, _ in top] == ["tabby", "goldfish", "cock"]
    assert top[0][2] == pytest.approx(0.6)


def test_class_names_read_from_source_match_keras_hub():
    from keras_hub.utils import imagenet_id_to_name

    names = models.imagenet_classes()
    assert [label for _, label in names] == [imagenet_id_to_name(i) for i in range(1000)]
    assert len({wnid for wnid, _ in names}) == 1000


def test_class_names_fall_back_to_the_import(monkeypatch):
    def broken(module, name):
        raise LookupError(name)

    monkeypatch.setattr(models, "_literal_from_source", broken)
    assert models.imagenet_classes()[281] == ("n02123045", "tabby")


def test_missing_weights_file_says_what_to_do(tmp_path):
    model = models.get_model("inception_v3", weights=str(tmp_path / "nope.h5"))
    with pytest.raises(models.ModelError) as error:
        model.load()
    message = str(error.value)
    assert "--weights" in message and "efficientnet_lite0" in message and "nope.h5" in message


def test_a_local_weights_file_is_loaded(tmp_path, inception):
    import keras

    keras.utils.set_random_seed(7)
    path = tmp_path / "inception.weights.h5"
    keras.applications.InceptionV3(weights=None).save_weights(path)
    from_file = models.get_model("inception_v3", weights=str(path)).load()
    assert from_file.model_id == "inception_v3"
    image = np.full((299, 299, 3), 100, np.uint8)
    v_file, _ = from_file.embed_batch([image])
    v_seed0, _ = inception.embed_batch([image])
    assert not np.allclose(v_file, v_seed0)  # the file's weights, not the seed-0 ones


def test_auto_uses_the_databases_model():
    chosen = models.choose("auto", "efficientnet_lite0:random")
    assert chosen.model_id == "efficientnet_lite0:random"


def test_cli_and_models_module_do_not_import_tensorflow():
    code = (
        "import sys, collection.cli, collection.models, collection.store, collection.ingest;"
        "from click.testing import CliRunner;"
        "r = CliRunner().invoke(collection.cli.cli, ['--help']); assert r.exit_code == 0;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'keras_hub')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _pil(arr):
    from PIL import Image

    return Image.fromarray(arr).convert("RGB")


def test_auto_picks_inception_when_its_weights_are_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.delenv("COLLECTION_WEIGHTS", raising=False)
    monkeypatch.setattr(models, "can_download", lambda url, timeout=3.0: False)  # no network here
    said = []
    assert models.choose("auto", None, echo=said.append).model_id == "efficientnet_lite0"
    assert "efficientnet_lite0" in said[0]
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / models.INCEPTION_WEIGHTS_FILE).write_bytes(b"weights")
    assert models.choose("auto", None).model_id == "inception_v3"


def test_auto_picks_inception_when_it_can_be_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.delenv("COLLECTION_WEIGHTS", raising=False)
    asked = []
    monkeypatch.setattr(models, "can_download", lambda url, timeout=3.0: asked.append(url) or True)
    assert models.choose("auto", None).model_id == "inception_v3"
    assert asked == [models.INCEPTION_WEIGHTS_URL]


def test_the_download_check_is_bounded():
    import socket
    import time

    # A local server that takes the connection and never answers: only the timeout ends it.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        start = time.monotonic()
        assert models.can_download(f"http://127.0.0.1:{server.getsockname()[1]}/w.h5", timeout=0.5) is False
        assert time.monotonic() - start < 5


def test_tensorflow_start_up_chatter_is_held_back_and_the_rest_passed_on(capfd):
    import os

    with models._without_tensorflow_chatter():
        os.write(2, b"I0000 00:00 123 cudart_stub.cc:31] Could not find cuda drivers\n")
        os.write(2, b"a real problem\n")
    assert capfd.readouterr().err == "a real problem\n"
