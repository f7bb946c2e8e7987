"""The collection map: projection, placing new images, refreshing, the `map` command,
and the map page's JSON and atlases through datasette.client. No model: tiny synthetic
collections of clustered unit vectors with thumbnails drawn by Pillow."""

from __future__ import annotations

import io
import json
import sqlite3
import threading

import numpy as np
import pytest
import pytest_asyncio
from click.testing import CliRunner
from PIL import Image, ImageDraw, ImageOps

from collection import projection
from collection.cli import cli
from collection.serve import open_datasette
from collection.store import Store

from test_plugin import raw_get

DIMENSIONS = 128
LABELS = [
    "tabby",
    "goldfish",
    "volcano",
    "daisy",
    "sports car",
    "pizza",
    "lighthouse",
    "zebra",
    "espresso",
    "jellyfish",
    "castle",
    "tractor",
    "strawberry",
    "toucan",
    "umbrella",
    "banjo",
]


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype("<f4")


def cluster_centres(clusters: int, dimensions: int = DIMENSIONS, seed: int = 0) -> np.ndarray:
    return unit(np.random.default_rng(seed).normal(size=(clusters, dimensions)))


def pattern(cluster: int, variant: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    """A picture per cluster (stripes, checks or rings in two colours); variants of one
    cluster differ a little in offset and brightness, like near-duplicate photos."""
    rng = np.random.default_rng(cluster)
    fg, bg = (tuple(int(c) for c in rng.integers(30, 256, 3)) for _ in range(2))
    shade = 1 + 0.04 * (variant % 3 - 1)
    fg, bg = (tuple(min(255, int(c * shade)) for c in colour) for colour in (fg, bg))
    image = Image.new("RGB", size, bg)
    draw = ImageDraw.Draw(image)
    w, h = size
    step = 8 + cluster % 5 * 3
    shift = variant * 2
    kind = cluster % 3
    if kind == 0:  # diagonal stripes
        for x in range(-h, w + h, step * 2):
            draw.polygon(
                [
                    (x + shift, 0),
                    (x + shift + step, 0),
                    (x + shift + step - h, h),
                    (x + shift - h, h),
                ],
                fill=fg,
            )
    elif kind == 1:  # checks
        for y in range(0, h, step):
            for x in range(0, w, step):
                if (x // step + y // step) % 2:
                    draw.rectangle([x + shift, y, x + shift + step - 1, y + step - 1], fill=fg)
    else:  # rings
        for r in range(max(w, h), 0, -step):
            if (r // step) % 2:
                draw.ellipse([w / 2 - r + shift, h / 2 - r, w / 2 + r + shift, h / 2 + r], fill=fg)
            else:
                draw.ellipse([w / 2 - r + shift, h / 2 - r, w / 2 + r + shift, h / 2 + r], fill=bg)
    return image


def jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


def add_image(
    store: Store, name: str, vector: np.ndarray, labels: list[str], thumb: Image.Image
) -> int:
    """One row as ingest writes it (in a transaction), without a model or a file."""
    with store.db.atomic():
        return store.save_image(
            f"/synthetic/{name}",
            0.0,
            {
                "sha256": f"sha-{name}",
                "size": 1000,
                "width": thumb.width,
                "height": thumb.height,
                "format": "JPEG",
            },
            vector,
            [(f"n{i:08d}", label, round(0.6 / (i + 1), 3)) for i, label in enumerate(labels)],
            "synthetic",
            (jpeg(thumb), thumb.width, thumb.height),
        )


def make_collection(
    db_path, clusters: int = 6, per_cluster: int = 8, spread: float = 0.15, seed: int = 0
) -> dict[int, int]:
    """Clusters of near-duplicates: vectors scattered around a centre per cluster, a
    pattern per cluster for the thumbnails, the cluster's label first. Returns id -> cluster."""
    rng = np.random.default_rng(seed + 1)
    centres = cluster_centres(clusters, seed=seed)
    store = Store(db_path)
    store.claim_model("synthetic", DIMENSIONS, "fp32")
    members = {}
    with store.db.atomic():
        for c in range(clusters):
            others = [LABELS[(c + k) % len(LABELS)] for k in (1, 2, 3, 4)]
            for v in range(per_cluster):
                vector = unit(
                    centres[c] + spread * rng.normal(size=DIMENSIONS) / np.sqrt(DIMENSIONS) * 4
                )
                image_id = add_image(
                    store,
                    f"c{c:02d}_v{v}.jpg",
                    vector,
                    [LABELS[c % len(LABELS)], *others],
                    pattern(c, v),
                )
                members[image_id] = c
    store.close()
    return members


def positions(store: Store) -> dict[int, tuple[float, float, int]]:
    return {
        row[0]: (row[1], row[2], row[3])
        for row in store.db.execute("select image_id, x, y, placed from projection")
    }


@pytest.fixture
def collection(db_path):
    return db_path, make_collection(db_path)


# --- projecting ------------------------------------------------------------------------


def test_project_fills_the_table_with_clusters_kept_together(collection):
    db_path, members = collection
    store = Store(db_path)
    result = projection.project(store, "tsne")
    assert (result.method, result.images, result.placed) == ("tsne", len(members), 0)
    rows = list(store.db["projection"].rows)
    assert sorted(r["image_id"] for r in rows) == sorted(members)
    assert {(r["method"], r["placed"]) for r in rows} == {("tsne", 0)}
    assert sorted(r["tile"] for r in rows) == list(range(len(members)))
    points = np.array([(r["x"], r["y"]) for r in rows])
    assert points.shape == (len(members), 2)
    assert points.min() >= 0 and points.max() <= 1 and np.isclose(np.ptp(points, axis=0).max(), 1)
    # every image is nearer its own cluster's centroid than any other cluster's
    labels = np.array([members[r["image_id"]] for r in rows])
    centroids = np.array([points[labels == c].mean(axis=0) for c in range(labels.max() + 1)])
    nearest = np.linalg.norm(points[:, None] - centroids[None], axis=2).argmin(axis=1)
    assert (nearest == labels).all()
    meta = {
        k: store.get_meta(f"projection_{k}") for k in ("method", "images", "version", "requested")
    }
    assert meta == {
        "method": "tsne",
        "images": str(len(members)),
        "version": "1",
        "requested": "tsne",
    }


def test_large_collections_get_t_sne_of_a_sample_with_clusters_kept_together(
    collection, monkeypatch
):
    db_path, members = collection
    monkeypatch.setattr(projection, "TSNE_MAX", 20)  # of 48 images
    store = Store(db_path)
    result = projection.project(store)
    assert result.method == "tsne-sample" and result.images == len(members)
    assert "t-SNE on a sample" in result.line()
    placed = positions(store)
    assert set(placed) == set(members) and {p for _, _, p in placed.values()} == {0}
    ids = sorted(members)
    points = np.array([placed[i][:2] for i in ids])
    labels = np.array([members[i] for i in ids])
    centroids = np.array([points[labels == c].mean(axis=0) for c in range(labels.max() + 1)])
    nearest = np.linalg.norm(points[:, None] - centroids[None], axis=2).argmin(axis=1)
    assert (nearest == labels).mean() > 0.95


def test_methods_for_collection_sizes():
    assert projection.choose_method("auto", 500) == "tsne"
    assert projection.choose_method("auto", projection.TSNE_MAX + 1) == "tsne-sample"
    assert projection.choose_method("tsne", projection.TSNE_MAX + 1) == "tsne"  # when asked
    assert projection.choose_method("pca", 500) == "pca"
    assert projection.choose_method("tsne", 3) == "pca"  # too few for t-SNE
    with pytest.raises(projection.ProjectionError):
        projection.choose_method("umap", 100)


@pytest.mark.parametrize("count", [1, 2, 5])
def test_tiny_collections_get_a_map(db_path, count):
    make_collection(db_path, clusters=1, per_cluster=count)
    store = Store(db_path)
    result = projection.project(store)
    points = np.array([(x, y) for x, y, _ in positions(store).values()])
    assert result.images == count and points.shape == (count, 2)
    assert ((0 <= points) & (points <= 1)).all()


def test_pca_method_and_deleted_images_left_out(collection):
    db_path, members = collection
    store = Store(db_path)
    gone = sorted(members)[:3]
    store.mark_deleted(gone)
    result = projection.project(store, "pca")
    assert result.method == "pca"
    assert set(positions(store)) == set(members) - set(gone)


def test_project_refuses_an_empty_collection(db_path):
    with pytest.raises(projection.ProjectionError, match="no images"):
        projection.project(Store(db_path))


# --- keeping it current ------------------------------------------------------------------


def test_place_new_does_nothing_without_a_map(collection):
    db_path, members = collection
    store = Store(db_path)
    assert projection.place_new(store, list(members)) == 0
    assert store.db["projection"].count == 0
    assert projection.summary(store.db.conn) is None
    assert not projection.needs_refresh(store)


def test_new_image_is_placed_near_its_neighbours(collection):
    db_path, members = collection
    store = Store(db_path)
    projection.project(store)
    before = positions(store)
    centres = cluster_centres(6)
    rng = np.random.default_rng(99)
    new_id = add_image(
        store,
        "new.jpg",
        unit(centres[4] + 0.02 * rng.normal(size=DIMENSIONS)),
        [LABELS[4]],
        pattern(4, 9),
    )

    assert projection.place_new(store, [new_id]) == 1
    after = positions(store)
    x, y, placed = after[new_id]
    assert placed == 1
    assert {k: v for k, v in after.items() if k != new_id} == before  # nothing else moved
    centroids = {
        c: np.mean([before[i][:2] for i, m in members.items() if m == c], axis=0) for c in range(6)
    }
    distances = {c: np.hypot(x - cx, y - cy) for c, (cx, cy) in centroids.items()}
    assert min(distances, key=distances.get) == 4
    tile = store.db.execute("select tile from projection where image_id = ?", [new_id]).fetchone()[
        0
    ]
    assert tile == len(members)  # a new tile after the projected ones


@pytest.mark.parametrize("per_cluster", [8, 64])
def test_placing_a_batch_reads_the_batch_vectors_only(tmp_path, monkeypatch, per_cluster):
    """The neighbours come from the similar-image searcher, so the vectors the map reads
    for a batch are the batch's own, whether the collection holds 48 images or 384."""
    db_path = tmp_path / "collection.db"
    make_collection(db_path, per_cluster=per_cluster)
    store = Store(db_path)
    projection.project(store)
    rng = np.random.default_rng(3)
    batch = [
        add_image(store, f"batch{i}.jpg", unit(rng.normal(size=DIMENSIONS)), [LABELS[i]], pattern(i, 1))
        for i in range(3)
    ]
    reads = []
    monkeypatch.setattr(projection, "on_vectors_read", reads.append)
    assert projection.place_new(store, batch) == 3
    assert sum(reads) == 3


def test_the_watcher_makes_the_first_map_once_there_are_enough_images(collection, monkeypatch):
    db_path, members = collection
    store = Store(db_path)
    monkeypatch.setattr(projection, "AUTO_MAP_MIN", len(members) + 1)
    assert not projection.needs_refresh(store)
    assert projection.refresh_in_background(store) is None
    add_image(store, "one_more.jpg", cluster_centres(6)[0], [LABELS[0]], pattern(0, 1))
    assert projection.needs_refresh(store)
    thread = projection.refresh_in_background(store)
    thread.join(timeout=120)
    state = projection.summary(store.db.conn)
    assert (state["method"], state["projected"]) == ("tsne", len(members) + 1)
    assert not projection.needs_refresh(store)


def test_a_stop_request_makes_a_recompute_give_up_without_writing(collection, monkeypatch):
    """A daemon asked to stop sets the event; the recompute in its background thread
    stops at its next read or before writing, so the daemon's last writes never wait
    for a map, and the map stays as it was."""
    db_path, members = collection
    store = Store(db_path)
    monkeypatch.setattr(projection, "AUTO_MAP_MIN", len(members))
    stopping = threading.Event()
    monkeypatch.setattr(projection, "on_vectors_read", lambda count: stopping.set())  # mid-layout
    with pytest.raises(projection.ProjectionError, match="stopped"):
        projection.project(store, stopping=stopping)
    assert projection.summary(store.db.conn) is None
    assert projection.needs_refresh(store)
    assert projection.refresh_in_background(store, stopping) is None  # none starts once stopping

    stopping = threading.Event()
    thread = projection.refresh_in_background(store, stopping)
    thread.join(timeout=120)  # this one sets the event at its first read and gives up
    assert not thread.is_alive()
    assert projection.summary(store.db.conn) is None
    monkeypatch.setattr(projection, "on_vectors_read", None)
    projection.refresh_in_background(store, threading.Event()).join(timeout=120)
    assert projection.summary(store.db.conn)["projected"] == len(members)


def test_place_new_inside_the_callers_transaction(collection):
    db_path, _ = collection
    store = Store(db_path)
    projection.project(store)
    with store.db.atomic():  # the watcher's batch: the image and its place commit together
        new_id = add_image(store, "batch.jpg", cluster_centres(6)[3], [LABELS[3]], pattern(3, 7))
        assert projection.place_new(store, [new_id]) == 1
        assert store.db.conn.in_transaction
    assert not store.db.conn.in_transaction
    other = Store(db_path)
    assert positions(other)[new_id][2] == 1


def test_place_new_leaves_unchanged_images_and_replaces_changed_content(collection):
    db_path, members = collection
    store = Store(db_path)
    projection.project(store)
    first = min(members)
    assert projection.place_new(store, [first]) == 0  # on the map with this content already
    assert positions(store)[first][2] == 0
    # the same path with new content (another cluster's vector): placed again
    row = store.by_id(first)
    with store.db.atomic():
        store.save_image(
            row["path"],
            1.0,
            {"sha256": "changed", "size": 1, "width": 8, "height": 8, "format": "JPEG"},
            cluster_centres(6)[5],
            [("n0", LABELS[5], 0.9)],
            "synthetic",
        )
    assert projection.place_new(store, [first, first]) == 1
    assert positions(store)[first][2] == 1
    assert (
        store.db.execute("select sha256 from projection where image_id = ?", [first]).fetchone()[0]
        == "changed"
    )


def test_needs_refresh_once_enough_has_changed_and_refresh_recomputes(collection):
    db_path, members = collection
    store = Store(db_path)
    projection.project(store)
    assert not projection.needs_refresh(store)
    assert projection.refresh_in_background(store) is None
    rng = np.random.default_rng(5)
    new = [
        add_image(
            store, f"late{i}.jpg", unit(rng.normal(size=DIMENSIONS)), [LABELS[i]], pattern(i, 0)
        )
        for i in range(int(len(members) * projection.REFRESH_FRACTION) + 1)
    ]
    projection.place_new(store, new[:2])
    assert projection.summary(store.db.conn) | {"at": None, "seconds": 0} == {
        "version": 1,
        "method": "tsne",
        "method_name": "t-SNE",
        "perplexity": 30.0,
        "at": None,
        "seconds": 0,
        "projected": len(members),
        "placed": 2,
        "unplaced": len(new) - 2,
    }
    assert projection.needs_refresh(store)

    thread = projection.refresh_in_background(store)
    assert thread is not None
    thread.join(timeout=120)
    assert not thread.is_alive()
    state = projection.summary(store.db.conn)
    assert (state["version"], state["projected"], state["placed"], state["unplaced"]) == (
        2,
        len(members) + len(new),
        0,
        0,
    )
    assert not projection.needs_refresh(store)


def test_a_large_map_reads_its_vectors_a_sample_and_a_chunk_at_a_time(collection, monkeypatch):
    db_path, members = collection
    monkeypatch.setattr(projection, "TSNE_MAX", 20)
    monkeypatch.setattr(projection, "CHUNK", 8)
    reads = []
    monkeypatch.setattr(projection, "on_vectors_read", reads.append)
    result = projection.project(Store(db_path))
    assert result.method == "tsne-sample"
    assert reads[0] == 20 and max(reads[1:]) <= 8 and sum(reads) == len(members)


def test_a_recompute_writes_the_map_in_bounded_transactions_beside_a_writer(collection, monkeypatch):
    """The new map goes into the side table WRITE_CHUNK rows per transaction; between
    them another connection commits at once (ingest does not wait for the whole map),
    the page keeps reading the old map until the swap, and an image deleted while the
    side table fills stays off the new map."""
    db_path, members = collection
    store = Store(db_path)
    projection.project(store, method="pca")
    old = positions(store)
    monkeypatch.setattr(projection, "WRITE_CHUNK", 10)
    written, seen_during = [], []
    victim = sorted(members)[-1]

    def between_chunks(rows):
        written.append(rows)
        other = sqlite3.connect(db_path, timeout=0)  # fails at once if the lock were held
        with other:
            other.execute("insert into collection_meta (key, value) values (?, 'x')", [f"meanwhile{len(written)}"])
            if len(written) == 1:
                other.execute("update images set deleted_at = 'now' where id = ?", [victim])
        seen_during.append(other.execute("select count(*) from projection").fetchone()[0])
        other.close()

    monkeypatch.setattr(projection, "on_map_write", between_chunks)
    projection.project(store, method="tsne")
    assert written and max(written) <= 10 and sum(written) <= len(members)
    assert len(written) == -(-len(members) // 10)
    assert seen_during[0] == len(old) - 1 and seen_during[-1] == len(old) - 1  # the old map, less the deleted one
    new = positions(store)
    assert set(new) == set(members) - {victim}
    assert store.get_meta("projection_method") == "tsne"
    assert store.db.execute("select count(*) from projection_next").fetchone()[0] == 0
    assert "projection_old" not in store.db.table_names()  # emptied in chunks, then dropped
    assert projection.map_data(store.db.conn)["lod"]["total"] == len(members) - 1


def test_a_recompute_started_later_takes_over_the_side_table(collection, monkeypatch):
    db_path, members = collection
    store = Store(db_path)

    def another_starts(rows):
        monkeypatch.setattr(projection, "on_map_write", None)
        projection.project(Store(db_path), method="pca")  # e.g. `collection map` meanwhile

    monkeypatch.setattr(projection, "WRITE_CHUNK", 10)
    monkeypatch.setattr(projection, "on_map_write", another_starts)
    with pytest.raises(projection.ProjectionError, match="another map recompute"):
        projection.project(store, method="tsne")
    assert store.get_meta("projection_method") == "pca"
    assert len(positions(store)) == len(members)


def test_images_added_during_a_projection_are_placed_on_it(collection, monkeypatch):
    db_path, members = collection
    store = Store(db_path)
    layout_from = projection.layout_from

    def slow_layout(*args, **kwargs):  # the watcher adds an image while t-SNE runs
        other = Store(db_path)
        add_image(other, "meanwhile.jpg", cluster_centres(6)[2], [LABELS[2]], pattern(2, 5))
        other.close()
        return layout_from(*args, **kwargs)

    monkeypatch.setattr(projection, "layout_from", slow_layout)
    result = projection.project(store)
    assert (result.images, result.placed) == (len(members), 1)
    assert len(positions(store)) == len(members) + 1


def test_map_command(collection):
    db_path, members = collection
    runner = CliRunner()
    result = runner.invoke(cli, ["map", "--db", str(db_path), "--method", "pca"])
    assert result.exit_code == 0, result.output
    assert f"{len(members)} images projected with PCA in" in result.output
    result = runner.invoke(cli, ["map", "--db", str(db_path), "--perplexity", "5"])
    assert result.exit_code == 0, result.output
    assert "projected with t-SNE" in result.output
    assert Store(db_path).get_meta("projection_version") == "2"


def test_map_command_errors_are_one_line(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["map", "--db", str(tmp_path / "missing.db")])
    assert result.exit_code == 1 and "no collection database" in result.output
    Store(tmp_path / "empty.db").close()
    result = runner.invoke(cli, ["map", "--db", str(tmp_path / "empty.db")])
    assert result.exit_code == 1 and "no images with vectors" in result.output
    assert "Traceback" not in result.output


# --- the page, its data and its atlases ----------------------------------------------------


@pytest_asyncio.fixture
async def mapped(collection):
    db_path, members = collection
    store = Store(db_path)
    projection.project(store)
    gone = max(members)
    store.mark_deleted([gone])
    late = add_image(
        store,
        "late.jpg",
        cluster_centres(6)[1],
        [LABELS[1], "<script>alert(1)</script>"],
        pattern(1, 4),
    )
    projection.place_new(store, [late])
    store.close()
    ds = open_datasette(db_path)
    await ds.invoke_startup()
    return ds, members, gone, late


@pytest.mark.asyncio
async def test_map_json_returns_every_live_image_once(mapped):
    ds, members, gone, late = mapped
    response = await ds.client.get("/-/map.json")
    assert response.status_code == 200
    data = response.json()
    images = data["images"]
    expected = sorted(set(members) - {gone} | {late})
    assert sorted(images["id"]) == expected and len(images["id"]) == len(expected)
    assert {len(column) for column in images.values()} == {len(expected)}
    assert all(0 <= v <= 1 for v in images["x"] + images["y"])
    names = data["label_names"]
    at = images["id"].index(late)
    assert images["placed"][at] == 1 and sum(images["placed"]) == 1
    assert [names[i] for i in images["labels"][at]] == [LABELS[1], "<script>alert(1)</script>"]
    assert names[images["top_label"][at]] == LABELS[1]
    assert data["projection"]["projected"] == len(members) - 1
    assert data["projection"]["placed"] == 1
    assert (
        data["atlas"]["per_atlas"] == projection.TILES_PER_ATLAS and len(data["atlas"]["keys"]) == 1
    )
    assert b'": ' not in response.content  # compact


@pytest.mark.asyncio
async def test_atlas_packs_the_thumbnails(mapped):
    ds, _, _, late = mapped
    data = (await ds.client.get("/-/map.json")).json()
    key = data["atlas"]["keys"]["0"]
    response = await ds.client.get(f"/-/map/atlas/0.jpg?v={key}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert response.headers["cache-control"] == "max-age=86400"
    atlas = Image.open(io.BytesIO(response.content))
    tiles = max(data["images"]["tile"]) + 1
    rows = -(-tiles // projection.ATLAS_COLUMNS)
    assert atlas.size == (projection.ATLAS_COLUMNS * projection.TILE, rows * projection.TILE)
    # the late image's tile shows its picture: nearer it than any other cluster's
    tile = data["images"]["tile"][data["images"]["id"].index(late)]
    size = projection.TILE
    column, row = tile % projection.ATLAS_COLUMNS, tile // projection.ATLAS_COLUMNS
    shown = np.asarray(
        atlas.crop((column * size, row * size, column * size + size, row * size + size)),
        dtype=float,
    )
    difference = {
        c: np.abs(shown - np.asarray(ImageOps.fit(pattern(c, 4), (size, size)), dtype=float)).mean()
        for c in range(6)
    }
    assert min(difference, key=difference.get) == 1
    unversioned = await ds.client.get("/-/map/atlas/0.jpg")
    assert unversioned.headers["cache-control"] == "no-cache"
    assert (await ds.client.get("/-/map/atlas/1.jpg")).status_code == 404


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "raw_path",
    [
        b"/-/map/atlas/..%2F..%2Fetc%2Fpasswd.jpg",
        b"/-/map/atlas/0.jpg/../../../etc/passwd",
        b"/-/map/atlas/%2Fetc%2Fpasswd",
        b"/-/map/atlas/-1.jpg",
        b"/-/map/atlas/999999.jpg",
        b"/-/map/atlas/99999999999999999999999.jpg",
    ],
)
async def test_atlas_paths_are_numbers_only(mapped, raw_path):
    status, body = await raw_get(mapped[0], raw_path)
    assert status == 404 and b"root:" not in body


@pytest.mark.asyncio
async def test_map_json_level_of_detail(mapped, monkeypatch):
    """Past FIRST_POINTS images the whole map comes as an even sample, and a box brings
    the images inside it: each answer says how many there are and how many it carries."""
    ds, members, gone, late = mapped
    live = set(members) - {gone} | {late}
    whole = (await ds.client.get("/-/map.json")).json()
    assert whole["lod"] == {"box": None, "total": len(live), "stride": 1}
    monkeypatch.setattr(projection, "FIRST_POINTS", 10)
    monkeypatch.setattr(projection, "MAP_POINTS", 10)
    sample = (await ds.client.get("/-/map.json")).json()
    assert sample["lod"]["stride"] == 5 and 8 <= len(sample["images"]["id"]) <= 10  # 48 / 5
    assert set(sample["images"]["id"]) <= live
    xs, ys = sample["images"]["x"], sample["images"]["y"]
    assert max(xs) - min(xs) > 0.5 or max(ys) - min(ys) > 0.5  # spread over the map, not a corner
    positions = dict(zip(whole["images"]["id"], zip(whole["images"]["x"], whole["images"]["y"])))
    box = (0.0, 0.0, 0.5, 0.5)
    inside = {i for i, (x, y) in positions.items() if x <= 0.5 and y <= 0.5}
    part = (await ds.client.get("/-/map.json?box=0,0,0.5,0.5")).json()
    assert part["lod"]["box"] == list(box)
    if len(inside) <= 10:
        assert set(part["images"]["id"]) == inside
    else:
        assert set(part["images"]["id"]) < inside and len(part["images"]["id"]) <= 10
    assert set(part["atlas"]["keys"]) == {str(t // projection.TILES_PER_ATLAS) for t in part["images"]["tile"]}
    for bad in ("1,2,3", "0,0,a,1", "1,0,0,1", "nan,0,1,1"):
        assert (await ds.client.get(f"/-/map.json?box={bad}")).status_code == 400


@pytest.mark.asyncio
async def test_map_card_names_the_file_its_labels_and_date(mapped):
    ds, members, gone, late = mapped
    card = (await ds.client.get(f"/-/map/image/{late}.json")).json()
    assert card == {
        "id": late,
        "name": "late.jpg",
        "labels": [{"label": LABELS[1], "score": 0.6}, {"label": "<script>alert(1)</script>", "score": 0.3}],
        "taken_at": None,
        "added_at": card["added_at"],
    }
    assert card["added_at"]
    assert (await ds.client.get(f"/-/map/image/{gone}.json")).status_code == 404
    assert (await ds.client.get("/-/map/image/99999.json")).status_code == 404
    assert (await ds.client.get("/-/map/image/x.json")).status_code == 404


@pytest.mark.asyncio
async def test_map_page(mapped):
    ds, members, _, _ = mapped
    response = await ds.client.get("/-/map")
    assert response.status_code == 200
    html = response.text
    assert '<canvas id="map-canvas"' in html and 'id="hover-card"' in html
    assert (
        f"{len(members) - 1} images projected" in html and "1 placed near their neighbours" in html
    )
    config = html.split('<script type="application/json" id="map-config">')[1].split("</script>")[0]
    assert json.loads(config) == {
        "data": "/-/map.json",
        "atlas": "/-/map/atlas/",
        "card": "/-/map/image/",
        "thumbnail": "/-/thumbnail/",
        "similar": "/-/similar/",
        "category_search": "/-/labels/search.json",
        "category_ids": "/-/labels/",
    }
    assert "<script>alert" not in html  # labels reach the page only as JSON, shown with textContent


@pytest.mark.asyncio
async def test_map_page_without_a_map(collection):
    ds = open_datasette(collection[0])
    await ds.invoke_startup()
    response = await ds.client.get("/-/map")
    assert response.status_code == 200
    assert "no map yet" in response.text and "collection map --db collection.db" in response.text
    data = (await ds.client.get("/-/map.json")).json()
    assert data["projection"] is None and data["images"]["id"] == []
    assert (await ds.client.get("/-/map/atlas/0.jpg")).status_code == 404


@pytest.mark.parametrize("count", [projection.FIRST_POINTS + 1, 3 * projection.MAP_POINTS])
def test_the_maps_first_answer_is_bounded_at_any_size(tmp_path, count):
    """The page's first data carries at most FIRST_POINTS images however large the map,
    gaps in the tiles included (deleted images, images placed again), spread over the
    whole map; a box carries at most MAP_POINTS."""
    store = Store(tmp_path / "big.db")
    rng = np.random.default_rng(0)
    xy = rng.random((count, 2))
    with store.db.conn:
        store.db.conn.executemany(
            "insert into images (id, path, labels, top_label) values (?, ?, '[\"tabby\"]', 'tabby')",
            ((i, f"/p/{i}.jpg") for i in range(1, count + 1)),
        )
        # every third tile left empty, as after deletions and placing again
        store.db.conn.executemany(
            "insert into projection (image_id, method, x, y, placed, tile) values (?, 'tsne', ?, ?, 0, ?)",
            ((i, float(x), float(y), (i - 1) * 3 // 2) for i, (x, y) in zip(range(1, count + 1), xy)),
        )
    store.set_meta("projection_version", 1)
    store.set_meta("projection_method", "tsne")
    first = projection.map_data(store.db.conn)
    shown = len(first["images"]["id"])
    assert first["lod"]["total"] == count
    assert projection.FIRST_POINTS // 2 <= shown <= projection.FIRST_POINTS
    assert first["atlas"]["keys"] == {}  # dots only: the page asks for a box before thumbnails
    xs, ys = np.array(first["images"]["x"]), np.array(first["images"]["y"])
    assert xs.min() < 0.1 and xs.max() > 0.9 and ys.min() < 0.1 and ys.max() > 0.9
    part = projection.map_data(store.db.conn, (0.0, 0.0, 1.0, 1.0))
    assert 0 < len(part["images"]["id"]) <= projection.MAP_POINTS
    store.close()
