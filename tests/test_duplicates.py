"""Duplicate groups: the three tiers, incremental upkeep against regrouping from scratch,
no chaining, decisions, the review page and its permission, the CLI, and a browser check."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from collection import duplicates
from collection.cli import cli
from collection.store import Store
from conftest import browser_page, free_port, needs_chromium, responds, wait_until

ROOT = Path(__file__).resolve().parent.parent
MODEL = "test-vectors"
DIMENSIONS = 16
NEAR, SIMILAR = 0.90, 0.60
HOSTILE = "<img src=x onerror=alert(1)>.jpg"


@pytest.fixture(autouse=True)
def thresholds(monkeypatch):
    monkeypatch.setenv("COLLECTION_NEAR_DUPLICATE", str(NEAR))
    monkeypatch.setenv("COLLECTION_SIMILAR", str(SIMILAR))


def unit(v) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return (v / np.linalg.norm(v)).astype("<f4")


def angled(degrees: float, plane: int = 0) -> np.ndarray:
    """A unit vector at ``degrees`` in the plane of axes (2 * plane, 2 * plane + 1)."""
    v = np.zeros(DIMENSIONS)
    v[2 * plane] = np.cos(np.radians(degrees))
    v[2 * plane + 1] = np.sin(np.radians(degrees))
    return unit(v)


def put(store: Store, name: str, vector, sha256: str | None = None, size=(100, 80), fmt="JPEG",
        folder: Path | None = None) -> int:
    """One image row with a given vector, as ingest would write it (no file needed)."""
    folder = folder or store.path.parent
    metadata = {"sha256": sha256 or f"sha-{name}", "size": size[0] * size[1], "width": size[0],
                "height": size[1], "format": fmt, "taken_at": None}
    with store.db.atomic():
        return store.save_image(str(folder / name), 1.0, metadata, vector, [("n0", "thing", 0.9)], MODEL)


def rows(store: Store) -> set[tuple]:
    return {
        (r["tier"], r["group_id"], r["image_id"], r["is_keeper"], round(r["score"], 5))
        for r in store.db["duplicate_groups"].rows
    }


def grouped(store: Store, tier: str) -> list[set[int]]:
    found: dict[int, set[int]] = {}
    for r in store.db["duplicate_groups"].rows_where("tier = ?", [tier]):
        found.setdefault(r["group_id"], set()).add(r["image_id"])
    return sorted(found.values(), key=min)


@pytest.fixture
def vstore(store):
    store.claim_model(MODEL, DIMENSIONS, "fp32")
    return store


def test_no_chaining_through_an_intermediate(vstore):
    # A ~ B and B ~ C at 0.92, but A and C only 0.69: never one near-duplicate group.
    a = put(vstore, "a.jpg", angled(0))
    b = put(vstore, "b.jpg", angled(23.07))
    c = put(vstore, "c.jpg", angled(46.14))
    duplicates.update(vstore, [a, b, c])
    assert grouped(vstore, "near") == [{a, b}]
    assert grouped(vstore, "similar") == [{a, b, c}]  # 0.69 >= 0.60: look-alikes
    # Every member within the threshold of its group's representative (the group id).
    for r in vstore.db["duplicate_groups"].rows_where("tier = 'near'"):
        rep = vstore.vector(r["group_id"])
        assert float(np.dot(rep, vstore.vector(r["image_id"]))) >= NEAR - 1e-6


def test_tiers_and_suggested_keeper(vstore):
    original = put(vstore, "photo.jpg", angled(0), sha256="same", size=(4000, 3000))
    copy = put(vstore, "copy.jpg", angled(0), sha256="same", size=(4000, 3000))
    small = put(vstore, "small.jpg", angled(3), size=(800, 600))
    png = put(vstore, "photo.png", angled(2), size=(4000, 3000), fmt="PNG")
    other = put(vstore, "other.jpg", angled(0, plane=1))
    duplicates.update(vstore)
    assert grouped(vstore, "exact") == [{original, copy}]
    assert grouped(vstore, "near") == [{original, copy, small, png}]
    keepers = {r["tier"]: r["image_id"] for r in vstore.db["duplicate_groups"].rows_where("is_keeper")}
    # Most pixels, then an original format (JPEG before PNG), then the oldest (the first added).
    assert keepers == {"exact": original, "near": original, "similar": original}
    assert other not in {r["image_id"] for r in vstore.db["duplicate_groups"].rows}
    scores = {r["image_id"]: r["score"] for r in vstore.db["duplicate_groups"].rows_where("tier = 'near'")}
    assert scores[original] == pytest.approx(1.0) and scores[small] == pytest.approx(np.cos(np.radians(3)), abs=1e-5)


def test_updates_equal_regrouping_from_scratch(vstore, tmp_path):
    """Adds, changes, copies, moves and deletes, each followed by the per-batch update:
    the table always equals a regrouping from scratch."""
    rng = np.random.default_rng(7)
    centres = [unit(rng.normal(size=DIMENSIONS)) for _ in range(6)]

    def near(centre, spread):
        return unit(centre + rng.normal(scale=spread, size=DIMENSIONS))

    ids: list[int] = []
    counter = iter(range(10_000))

    def check():
        incremental = rows(vstore)
        duplicates.regroup(vstore)
        assert rows(vstore) == incremental
        return incremental

    for step in range(12):
        batch = []
        for _ in range(int(rng.integers(3, 9))):  # adds, around a few centres
            centre = centres[int(rng.integers(len(centres)))]
            batch.append(put(vstore, f"{next(counter)}.jpg", near(centre, float(rng.choice([0.05, 0.2, 0.5])))))
        if ids:  # a changed file: same id, new vector and bytes
            changed = ids[int(rng.integers(len(ids)))]
            row = vstore.by_id(changed)
            if row["deleted_at"] is None:
                batch.append(put(vstore, Path(row["path"]).name, near(centres[int(rng.integers(6))], 0.1)))
        if len(ids) > 4:  # an exact copy of a live image, as ingest's reuse writes it
            source = vstore.by_id(ids[int(rng.integers(len(ids)))])
            if source["deleted_at"] is None:
                with vstore.db.atomic():
                    batch.append(vstore.copy(source["id"], str(tmp_path / f"copy-{next(counter)}.jpg"), 2.0))
        duplicates.update(vstore, batch)
        ids.extend(i for i in batch if i not in ids)
        if step % 2:  # deletions, representatives among them
            gone = [int(i) for i in rng.choice(ids, size=3, replace=False)]
            with vstore.db.atomic():
                vstore.mark_deleted(gone)
            duplicates.update(vstore, gone)
        if step == 5:  # a row removed for good, as a move onto its path does
            with vstore.db.atomic():
                vstore.delete_rows([ids[0]])
            duplicates.update(vstore)  # no ids given: the change log names it
        check()
    final = check()
    assert {t for t, *_ in final} == {"exact", "near", "similar"}  # every tier has groups to compare
    assert len(final) > 20


def test_added_image_never_moves_others(vstore):
    """Stable as images are added: existing members keep their groups."""
    first = [put(vstore, f"{i}.jpg", angled(i * 5.0)) for i in range(6)]
    duplicates.update(vstore, first)
    before = {(t, g, i) for t, g, i, *_ in rows(vstore)}
    later = [put(vstore, f"late-{i}.jpg", angled(i * 7.0 + 1)) for i in range(6)]
    duplicates.update(vstore, later)
    after = {(t, g, i) for t, g, i, *_ in rows(vstore)}
    assert {entry for entry in after if entry[2] in first} >= before


def test_work_per_batch_is_the_batch(vstore):
    """Adding to a collection re-decides the new images only, however large it is."""
    rng = np.random.default_rng(3)
    many = [put(vstore, f"{i}.jpg", unit(rng.normal(size=DIMENSIONS))) for i in range(300)]
    assert duplicates.update(vstore, many) == 300  # the first pass: everything
    batch = [put(vstore, "copy-of-7.jpg", vstore.vector(many[7])), put(vstore, "new.jpg", angled(10, plane=5))]
    assert duplicates.update(vstore, batch) == 2
    with vstore.db.atomic():
        vstore.mark_deleted([many[7]])  # a representative goes: it, its members and their neighbours
    members = {r["image_id"] for r in vstore.db["duplicate_groups"].rows_where("group_id = ?", [many[7]])}
    assert 2 <= duplicates.update(vstore, [many[7]]) <= 2 * len(members) + 2 < 30


def test_a_pass_reads_each_images_candidates_in_one_statement(vstore):
    """An image's search finds many candidates; their vectors and table rows are read in
    one statement each, not one per candidate (the upkeep runs after every batch)."""
    crowd = [put(vstore, f"{i}.jpg", angled(i * 0.5)) for i in range(40)]  # all within NEAR of each other
    duplicates.update(vstore, crowd)
    statements = []
    vstore.db.conn.set_trace_callback(statements.append)
    try:
        batch = [put(vstore, f"late-{i}.jpg", angled(i * 0.5 + 0.25)) for i in range(3)]
        decided = duplicates.update(vstore, batch)
    finally:
        vstore.db.conn.set_trace_callback(None)
    vector_reads = [s for s in statements if "from vectors" in s]
    group_reads = [s for s in statements if s.startswith("select tier, image_id, group_id from duplicate_groups")]
    assert decided >= len(batch)
    assert 0 < len(vector_reads) <= 2 * decided + 2 < 40  # not one per candidate
    assert 0 < len(group_reads) <= decided + 2
    assert any(len(g) > 1 for g in grouped(vstore, "near"))


def test_decisions_survive_regrouping(vstore):
    a = put(vstore, "a.jpg", angled(0), size=(100, 80))
    b = put(vstore, "b.jpg", angled(2), size=(200, 160))
    c = put(vstore, "c.jpg", angled(4), size=(50, 40))
    d = put(vstore, "d.jpg", angled(0, plane=2))
    e = put(vstore, "e.jpg", angled(3, plane=2))
    duplicates.update(vstore)
    conn = vstore.db.conn
    (group,) = duplicates.groups(conn, "near", [a])
    assert group["keeper_id"] == b  # the most pixels
    with vstore.db.atomic():
        duplicates.decide(conn, "near", a, a, "keep", "root")
        duplicates.decide(conn, "near", a, c, "not_duplicate", "root")
        duplicates.decide(conn, "near", d, None, "ignore", "root")
    duplicates.regroup(vstore)
    put(vstore, "f.jpg", angled(10, plane=3))  # unrelated arrivals and a from-scratch pass
    duplicates.update(vstore)
    duplicates.regroup(vstore)
    (group,) = duplicates.groups(conn, "near", [a])
    roles = {m["image_id"]: m["role"] for m in group["members"]}
    assert roles == {a: "keeper", b: "duplicate", c: "not_duplicate"}
    assert group["keeper_id"] == a and group["wasted_bytes"] == 200 * 160
    assert duplicates.group_ids(conn, "near") == [a]  # the ignored group is hidden ...
    assert duplicates.group_ids(conn, "near", ignored=True) == [a, d]  # ... unless asked for
    assert {m["role"] for m in duplicates.groups(conn, "near", [d])[0]["members"]} == {"ignored"}
    with pytest.raises(duplicates.DuplicatesError):
        duplicates.decide(conn, "near", a, e, "keep", "root")  # not in that group
    with pytest.raises(duplicates.DuplicatesError):
        duplicates.decide(conn, "near", a, a, "delete", "root")  # no such decision


def test_thresholds_from_the_environment(vstore, monkeypatch):
    a = put(vstore, "a.jpg", angled(0))
    b = put(vstore, "b.jpg", angled(20))  # cosine 0.94
    duplicates.update(vstore)
    assert grouped(vstore, "near") == [{a, b}]
    monkeypatch.setenv("COLLECTION_NEAR_DUPLICATE", "0.95")
    duplicates.update(vstore)  # other thresholds: regrouped from scratch
    assert grouped(vstore, "near") == []
    monkeypatch.setenv("COLLECTION_NEAR_DUPLICATE", "nonsense")
    with pytest.raises(duplicates.DuplicatesError, match="COLLECTION_NEAR_DUPLICATE"):
        duplicates.update(vstore)


# --- a collection of real photos, for the review page, the CLI and the browser ----------


def colour_layout(image) -> np.ndarray:
    """A stand-in vector without a model (as in test_browser): the colour layout at 8x8."""
    from PIL import Image

    small = np.asarray(image.convert("RGB").resize((8, 8), Image.Resampling.BILINEAR), np.float32)
    v = small.ravel() - small.mean()
    return (v / np.linalg.norm(v)).astype("<f4")


def build_photo_collection(folder: Path, db_path: Path) -> dict[str, int]:
    """Sample photos with a half-size copy, a PNG re-encode and an exact copy each, plus a
    file with a hostile name; real files and thumbnails, stand-in vectors; grouped."""
    from PIL import Image

    from collection import images
    from conftest import sample_photos

    folder.mkdir(exist_ok=True)
    photos = sample_photos()
    for name in ("chelsea", "coffee", "rocket"):
        photo = Image.fromarray(photos[name]).convert("RGB")
        photo.save(folder / f"{name}.jpg", quality=90)
        photo.resize((photo.width // 2, photo.height // 2)).save(folder / f"{name}-half.jpg", quality=80)
        photo.save(folder / f"{name}.png")
        (folder / f"{name}-copy.jpg").write_bytes((folder / f"{name}.jpg").read_bytes())
    Image.fromarray(photos["astronaut"]).save(folder / "astronaut.jpg")
    (folder / HOSTILE).write_bytes((folder / "astronaut.jpg").read_bytes())
    store = Store(db_path)
    store.claim_model("colour-layout-8x8", 192, "fp32")
    ids = {}
    with store.db.atomic():
        for path in sorted(folder.iterdir()):
            decoded = images.decode(path)
            ids[path.name] = store.save_image(
                str(path), os.stat(path).st_mtime, decoded.metadata(), colour_layout(decoded.image),
                [("n0", "thing", 0.5)], "colour-layout-8x8",
                (images.thumbnail(decoded.image), decoded.width, decoded.height),
            )
    duplicates.update(store)
    store.close()
    return ids


@pytest.fixture
def photos(tmp_path):
    db_path = tmp_path / "collection.db"
    return db_path, build_photo_collection(tmp_path / "photos", db_path)


def test_photo_collection_groups(photos):
    db_path, ids = photos
    store = Store(db_path)
    exact = grouped(store, "exact")
    near = grouped(store, "near")
    store.close()
    for name in ("chelsea", "coffee", "rocket"):
        assert {ids[f"{name}.jpg"], ids[f"{name}-copy.jpg"]} in exact
        assert {ids[f"{name}.jpg"], ids[f"{name}-copy.jpg"], ids[f"{name}-half.jpg"], ids[f"{name}.png"]} in near
    assert {ids["astronaut.jpg"], ids[HOSTILE]} in exact
    assert len(exact) == 4 and len(near) == 4


@pytest.fixture
def datasette(photos):
    from collection.serve import open_datasette, find_metadata

    db_path, ids = photos
    ds = open_datasette(db_path, find_metadata())
    return ds, ids


def cookie_header(**cookies) -> dict:
    return {"cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())}


@pytest.mark.asyncio
async def test_review_page_and_json(datasette):
    ds, ids = datasette
    page = await ds.client.get("/-/duplicates")
    assert page.status_code == 200
    assert page.text.count('class="dup-group"') == 4  # near is the default tier
    assert "&lt;img src=x onerror=alert(1)&gt;.jpg" in page.text
    assert "dup-member dup-keeper" in page.text
    assert "review-duplicates" in page.text  # says which permission records decisions
    assert "<form" not in page.text.split("<h1>", 1)[1]  # no decision buttons for anonymous
    data = (await ds.client.get("/-/duplicates.json?tier=exact")).json()
    assert data["tier"] == "exact" and data["counts"] == {"exact": 4, "near": 4, "similar": data["counts"]["similar"]}
    group = next(g for g in data["groups"] if ids["chelsea.jpg"] in [m["image_id"] for m in g["members"]])
    assert [m["role"] for m in group["members"]] == ["keeper", "duplicate"]
    assert group["keeper_id"] == ids["chelsea.jpg"]  # same pixels and format: the first added
    assert group["wasted_bytes"] == os.path.getsize(group["members"][1]["path"])
    assert (await ds.client.get("/-/duplicates?tier=everything")).status_code == 400
    assert (await ds.client.get("/-/duplicates?after=1;drop")).status_code == 400


@pytest.mark.asyncio
async def test_decisions_need_the_permission(datasette, photos):
    ds, ids = datasette
    db_path, _ = photos
    half = ids["chelsea-half.jpg"]
    before = (await ds.client.get("/-/duplicates.json")).json()
    chelsea = next(g for g in before["groups"] if half in [m["image_id"] for m in g["members"]])
    group_id = chelsea["group_id"]
    assert chelsea["keeper_id"] == ids["chelsea.jpg"]  # the most pixels, then JPEG over PNG
    form = {"tier": "near", "group_id": str(group_id), "image_id": str(half), "decision": "keep"}

    def decisions() -> list:
        conn = __import__("sqlite3").connect(db_path)
        try:
            return conn.execute("select tier, group_id, image_id, decision, actor from duplicate_decisions").fetchall()
        finally:
            conn.close()

    anonymous = await ds.client.post("/-/duplicates", data=form)
    assert anonymous.status_code == 403
    assert decisions() == []

    actor = ds.sign({"a": {"id": "root"}}, "actor")
    page = await ds.client.get("/-/duplicates", headers=cookie_header(ds_actor=actor))
    token = page.cookies["ds_csrftoken"]
    assert f'name="csrftoken" value="{token}"' in page.text
    no_token = await ds.client.post("/-/duplicates", data=form, headers=cookie_header(ds_actor=actor))
    assert no_token.status_code == 403  # Datasette's CSRF protection
    assert decisions() == []

    done = await ds.client.post(
        "/-/duplicates", data={**form, "csrftoken": token}, headers=cookie_header(ds_actor=actor, ds_csrftoken=token)
    )
    assert done.status_code == 302
    assert decisions() == [("near", group_id, half, "keep", "root")]
    data = (await ds.client.get("/-/duplicates.json")).json()
    chelsea = next(g for g in data["groups"] if g["group_id"] == group_id)
    assert chelsea["keeper_id"] == half
    assert os.path.exists(chelsea["members"][1]["path"])  # a decision never touches a file

    bad = await ds.client.post(
        "/-/duplicates", data={**form, "image_id": str(ids["coffee.jpg"]), "csrftoken": token},
        headers=cookie_header(ds_actor=actor, ds_csrftoken=token),
    )
    assert bad.status_code == 302 and len(decisions()) == 1  # not in that group: refused with a message


@pytest.mark.asyncio
async def test_permission_granted_by_the_plugin_configuration(photos):
    from collection.serve import open_datasette

    db_path, ids = photos
    ds = open_datasette(db_path)
    ds._metadata_local = {"plugins": {"duplicates": {"allow": {"id": "alice"}}}}
    assert await ds.permission_allowed({"id": "alice"}, "review-duplicates") is True
    assert await ds.permission_allowed({"id": "bob"}, "review-duplicates") is False
    assert await ds.permission_allowed(None, "review-duplicates") is False
    assert await ds.permission_allowed({"id": "root"}, "review-duplicates") is True


def test_cli_lists_groups_for_scripts(photos):
    db_path, ids = photos
    runner = CliRunner()
    result = runner.invoke(cli, ["duplicates", "--db", str(db_path), "--tier", "exact", "--csv"])
    assert result.exit_code == 0, result.output
    listed = list(csv.DictReader(io.StringIO(result.stdout)))
    assert {r["role"] for r in listed} == {"keeper", "duplicate"}
    assert sorted(Path(r["path"]).name for r in listed if r["role"] == "duplicate") == [
        HOSTILE, "chelsea-copy.jpg", "coffee-copy.jpg", "rocket-copy.jpg"]  # written after astronaut.jpg
    result = runner.invoke(cli, ["duplicates", "--db", str(db_path), "--json"])
    assert result.exit_code == 0
    near = json.loads(result.stdout)
    assert len({m["group_id"] for m in near}) == 4 and all(m["tier"] == "near" for m in near)
    result = runner.invoke(cli, ["duplicates", "--db", str(db_path)])
    assert "near group" in result.stdout and "4 near groups" in result.stderr
    result = runner.invoke(cli, ["duplicates", "--db", str(db_path), "--json", "--csv"])
    assert result.exit_code != 0 and "one of --json and --csv" in result.output


@pytest.mark.browser
@needs_chromium
def test_review_page_in_chromium(photos, tmp_path):
    """The page in a real browser: thumbnails decode, the keeper is marked, a signed-in
    reviewer's "keep this one" goes through the form (with its CSRF token) and sticks."""
    pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    from datasette.app import Datasette

    db_path, ids = photos
    secret = "test-secret"
    port = free_port()
    log = open(tmp_path / "datasette.log", "w")
    process = subprocess.Popen(  # `collection serve` registers the plugins, as the entry points do
        [sys.executable, "-m", "collection", "serve", "--db", str(db_path), "--metadata", str(ROOT / "metadata.yml"),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "DATASETTE_SECRET": secret},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: process.poll() is not None or responds(f"{base}/-/versions.json"), timeout=60)
        assert process.poll() is None, (tmp_path / "datasette.log").read_text()
        actor = Datasette([], secret=secret).sign({"a": {"id": "root"}}, "actor")
        with browser_page() as page:
            page.goto(f"{base}/-/duplicates?tier=near")
            assert page.locator(".dup-group").count() == 4
            assert page.locator(".dup-member form").count() == 0  # anonymous: no buttons
            page.context.add_cookies([{"name": "ds_actor", "value": actor, "url": base}])
            page.goto(f"{base}/-/duplicates?tier=near")
            for img in page.locator(".dup-member img").all():
                img.scroll_into_view_if_needed()
            page.wait_for_function("() => Array.from(document.images).every(i => i.complete)")
            widths = page.eval_on_selector_all(".dup-member img", "imgs => imgs.map(i => i.naturalWidth)")
            assert len(widths) == 14 and all(w > 0 for w in widths)
            chelsea = page.locator(".dup-group", has=page.locator(f"[data-image-id='{ids['chelsea.jpg']}']"))
            assert chelsea.locator(".dup-keeper").get_attribute("data-image-id") == str(ids["chelsea.jpg"])
            half = chelsea.locator(f"[data-image-id='{ids['chelsea-half.jpg']}']")
            half.get_by_role("button", name="keep this one").click()
            page.wait_for_load_state()
            assert "Recorded: keep this one" in page.locator(".message-info").inner_text()
            chelsea = page.locator(".dup-group", has=page.locator(f"[data-image-id='{ids['chelsea.jpg']}']"))
            assert chelsea.locator(".dup-keeper").get_attribute("data-image-id") == str(ids["chelsea-half.jpg"])
            assert page.get_by_text(HOSTILE).count() == 1  # shown as text, never as markup
            page.get_by_role("link", name="exact (4)").click()
            page.wait_for_url("**tier=exact")
            page.wait_for_load_state()  # count on the new page, not mid-navigation
            assert page.locator(".dup-group").count() == 4
            page.goto(f"{base}/-/duplicates?tier=near")
            (ROOT / "screenshots").mkdir(exist_ok=True)
            page.screenshot(path=str(ROOT / "screenshots" / "duplicates.png"), full_page=True)
            assert page.dialogs == []  # the hostile file name ran no script
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


@pytest.mark.asyncio
async def test_canned_queries(datasette):
    ds, ids = datasette
    wasted = (await ds.client.get("/collection/duplicate_wasted_bytes.json?tier=exact&_shape=array")).json()
    assert len(wasted) == 4
    sizes = {r["keeper_id"]: r["wasted_bytes"] for r in wasted}
    assert sizes[ids["chelsea.jpg"]] == os.path.getsize(Path(ds.databases["collection"].path).parent / "photos" / "chelsea-copy.jpg")
    by_size = (await ds.client.get("/collection/duplicate_groups_by_size.json?tier=near&_shape=array")).json()
    assert [r["images"] for r in by_size] == [4, 4, 4, 2]


def test_page_queries_use_indexes(photos):
    db_path, _ = photos
    store = Store(db_path)
    conn = store.db.conn
    plans = []
    original = conn.execute

    def explained(sql, params=()):
        plans.append(" ".join(r[3] for r in original(f"explain query plan {sql}", params)))
        return original(sql, params)

    class Recording:  # the page's reads, with their plans
        execute = staticmethod(explained)

    ids = duplicates.group_ids(Recording, "near", 0, 20)
    duplicates.groups(Recording, "near", ids)
    store.close()
    assert len(plans) == 2
    for plan in plans:  # groups found through (tier, group_id), images by their id
        assert "SEARCH g USING" in plan and "SCAN g" not in plan and "SCAN i" not in plan, plan


# --- the first grouping of a collection from before duplicates --------------------------


def _clustered_collection(vstore, count: int = 40) -> list[int]:
    rng = np.random.default_rng(11)
    centres = [unit(rng.normal(size=DIMENSIONS)) for _ in range(5)]
    return [
        put(vstore, f"img{i}.jpg", unit(centres[i % 5] + rng.normal(scale=0.25, size=DIMENSIONS)),
            sha256="twin" if i in (3, 31) else None)
        for i in range(count)
    ]


def _forget_groups(store: Store) -> None:
    """As a database from before duplicates: no groups, no record of them."""
    with store.db.atomic():
        store.db.execute("delete from duplicate_groups")
        store.db.execute("delete from collection_meta where key like 'duplicates\\_%' escape '\\'")


def test_first_grouping_of_a_large_collection_runs_in_the_background(vstore, monkeypatch):
    """A collection never grouped (upgraded) is grouped by a background thread, a chunk
    per transaction, never inside the batch's upkeep; the result equals a grouping from
    scratch, and a batch written meanwhile is caught up."""
    import threading

    from collection.upkeep import Upkeep

    ids = _clustered_collection(vstore)
    duplicates.regroup(vstore)
    expected_before = rows(vstore)
    assert expected_before
    _forget_groups(vstore)
    monkeypatch.setattr(duplicates, "GROUP_AT_ONCE", 10)
    monkeypatch.setattr(duplicates, "REGROUP_CHUNK", 7)
    chunks = []
    monkeypatch.setattr(duplicates, "on_regroup_chunk", lambda n: chunks.append((n, threading.current_thread().name)))
    upkeep = Upkeep(vstore, refresh_map=False)
    late = put(vstore, "late.jpg", vstore.vector(ids[0]))  # a copy of the first, at once
    upkeep.after_batch([late])
    assert all(name == "duplicates-regroup" for _, name in chunks)  # none in the caller's thread
    duplicates.wait_for_regroup(vstore.path, 60)
    assert chunks and max(n for n, _ in chunks) <= 7
    assert sum(n for n, _ in chunks) >= len(ids)
    assert vstore.get_meta("duplicates_fill") is None
    grown = rows(vstore)
    duplicates.regroup(vstore)
    assert rows(vstore) == grown
    assert any(r[2] == late for r in grown if r[0] == "near")
    upkeep.join()


def test_a_stopped_first_grouping_resumes_where_it_stopped(vstore, monkeypatch):
    import threading

    _clustered_collection(vstore)
    duplicates.regroup(vstore)
    expected = rows(vstore)
    _forget_groups(vstore)
    monkeypatch.setattr(duplicates, "REGROUP_CHUNK", 9)
    stop = threading.Event()
    counted = []
    monkeypatch.setattr(duplicates, "on_regroup_chunk", lambda n: (counted.append(n), stop.set()))
    duplicates.regroup(vstore, stop)
    assert counted == [9] and json.loads(vstore.get_meta("duplicates_fill"))["after"] > 0
    assert vstore.get_meta("duplicates_seq") is None  # not done: upkeep keeps asking for it
    monkeypatch.setattr(duplicates, "on_regroup_chunk", counted.append)
    duplicates.regroup(vstore)
    assert sum(counted) == 40  # each image decided once over the two runs
    assert rows(vstore) == expected


def test_a_bad_threshold_stops_the_start_with_its_message(vstore, monkeypatch, tmp_path):
    from collection.upkeep import Upkeep

    monkeypatch.setenv("COLLECTION_SIMILAR", "lots")
    with pytest.raises(duplicates.DuplicatesError, match="COLLECTION_SIMILAR must be a cosine"):
        Upkeep(vstore)
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / "red.png")
    result = CliRunner().invoke(cli, ["add", str(folder), "--db", str(vstore.path)])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: COLLECTION_SIMILAR must be a cosine from -1 to 1, not 'lots'"


# --- the layouts kept across passes -------------------------------------------------------


def thumbnails_of_samples(count: int) -> list[bytes]:
    """``count`` distinct thumbnails (JPEG) cut from the shipped sample photos."""
    from PIL import Image

    from collection import images
    from conftest import sample_photos

    photos = [Image.fromarray(a).convert("RGB") for a in sample_photos().values()]
    out = []
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        shift = 7 * (i // len(photos))
        out.append(images.thumbnail(photo.crop((shift, shift, w - shift, h - shift))))
    return out


def test_layout_cache_gives_layout_and_holds_at_most_its_entries():
    jpegs = thumbnails_of_samples(5)
    cache = duplicates.LayoutCache(entries=3)
    first = [cache(j) for j in jpegs]
    for jpeg, found in zip(jpegs, first):
        assert np.array_equal(found, duplicates.layout(jpeg))  # the same numbers as computed afresh
    assert len(cache) == 3  # bounded: the two least recently used went
    assert cache(jpegs[4]) is first[4]  # cached: not computed again
    assert cache(bytes(jpegs[4])) is first[4]  # keyed by the bytes, not the object
    assert cache(jpegs[0]) is not first[0]  # evicted: computed again, to the same numbers
    assert np.array_equal(cache(jpegs[0]), first[0])
    assert cache(None) is None and len(cache) == 3
    with pytest.raises(ValueError):
        first[4][0, 0] = 1.0  # shared between passes: read-only


@pytest.mark.parametrize("size", [(256, 256), (256, 170), (171, 256), (40, 30), (20, 13), (256, 1), (1, 1)])
def test_layout_windows_are_pillows_box_reduction(size):
    """The products that reduce each window are Pillow's BOX resize of the same box
    (within the one level Pillow's two 8-bit passes round off), whatever the shape,
    edge cases and enlarging included."""
    from PIL import Image

    w, h = size
    grey = np.random.default_rng(w * 1000 + h).integers(0, 256, (h, w), dtype=np.uint8)
    rows, columns = duplicates._window_weights(w, h)
    ours = rows @ grey.astype(np.float32) @ columns
    pillows = np.stack([
        np.asarray(Image.fromarray(grey).resize(
            (duplicates.LAYOUT_SIDE,) * 2, Image.Resampling.BOX,
            box=(round(left * w), round(top * h), round(right * w), round(bottom * h)),
        ), np.float32)
        for left, top, right, bottom in duplicates.LAYOUT_WINDOWS
    ])
    assert np.abs(ours - pillows).max() <= 1.0


def test_layout_blur_is_the_box_around_each_pixel():
    side, radius = duplicates.LAYOUT_SIDE, duplicates.LAYOUT_BLUR
    image = np.random.default_rng(0).random((side, side))
    blur = duplicates._blur_matrix(side, radius)
    padded = np.pad(image, radius, mode="edge")
    expected = np.array([
        [padded[y : y + 2 * radius + 1, x : x + 2 * radius + 1].mean() for x in range(side)] for y in range(side)
    ])
    assert np.allclose(blur @ image @ blur.T, expected)


def test_upkeep_works_out_each_thumbnail_layout_once(photos, monkeypatch):
    """The layouts of the representatives a later batch is checked against come from the
    cache kept across passes, not from decoding their thumbnails again; the groups are
    the same as from scratch."""
    db_path, ids = photos
    store = Store(db_path)
    worked_out = []
    real = duplicates.layout
    monkeypatch.setattr(duplicates, "layout", lambda jpeg: worked_out.append(jpeg) or real(jpeg))
    monkeypatch.setattr(duplicates, "_layouts", duplicates.LayoutCache(64))
    before = rows(store)
    for _ in range(2):  # every image re-decided, twice, in separate passes
        duplicates.update(store, list(ids.values()))
        assert rows(store) == before
    assert worked_out and len(worked_out) == len(set(worked_out))
    store.close()


def test_layout_keeps_weights_for_thumbnail_sizes_only():
    """A row whose "thumbnail" is larger than any the project writes (an imported or
    crafted one) gets its layout without growing the weights cache."""
    from PIL import Image

    duplicates._window_weights.cache_clear()
    for size in ((256, 171), (1000, 40)):
        out = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, size[::-1], np.uint8)).save(out, "JPEG")
        assert duplicates.layout(out.getvalue()).shape == (len(duplicates.LAYOUT_WINDOWS), duplicates.LAYOUT_SIDE**2)
    assert duplicates._window_weights.cache_info().currsize == 1
