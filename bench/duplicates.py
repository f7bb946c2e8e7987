"""Precision and recall of the duplicate tiers on a labelled set made from real photos.

    .venv/bin/python bench/duplicates.py [--models efficientnet_lite0,inception_v3:random]

For each original (../shared/photos when present, and the scikit-image and
scikit-learn sample photos) it writes:

- an exact copy (the same bytes under another name);
- true near-duplicates: resized 0.3x, 0.6x and 2x; JPEG at quality 30, 60 and 95;
  PNG and WebP re-encodes; 10 % cropped off one side; 5 % cropped off every side;
  rotated by EXIF (pixels turned, the orientation tag turning them back);
  brightness +15 % and -15 %; a caption band added below;
- hard negatives: crops keeping 50 % and 36 % of the scene, and two neighbouring
  frames of a panned view (each 85 % of the width, 15 % apart), plus the real right
  frame of scikit-image's stereo motorcycle pair beside motorcycle_left.

Every file goes through `collection add`'s path (Ingester with the per-batch
upkeep, so the groups are the incremental ones), in a new database per model. A pair
is positive when both files are the original, its copy or its near-duplicates;
negative when they come from different originals (other photos, some of the same
class), or when either is a hard negative of the same original (a pan frame against
the original itself is left unlabelled: it is neither a small crop nor a new view).
Group-level figures count the labelled pairs that share a group. The pairwise tables
are the evidence for the thresholds: the cosine alone against the cosine with the
layout check, and thresholds chosen on one half of the originals, measured on the other.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from collection import duplicates  # noqa: E402
from collection.ingest import Ingester  # noqa: E402
from collection.models import get_model  # noqa: E402
from collection.search import one_blas_thread  # noqa: E402
from collection.store import Store  # noqa: E402
from collection.upkeep import Upkeep  # noqa: E402
from machine import cpu_flags  # noqa: E402  (bench/machine.py, beside this script)

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "photos"
SHARED_FALLBACK = Path("/work/shared/photos")
POSITIVE = "near"
NEGATIVE = "negative"
PAN = "pan"


def originals() -> dict[str, Image.Image]:
    from skimage import data
    from sklearn.datasets import load_sample_image

    found: dict[str, Image.Image] = {}
    folder = SHARED if SHARED.is_dir() else SHARED_FALLBACK
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in (".jpg", ".png"):
                found[path.stem] = Image.open(path).convert("RGB")
    samples = {
        "chelsea": data.chelsea, "coffee": data.coffee, "rocket": data.rocket, "astronaut": data.astronaut,
        "camera": data.camera, "coins": data.coins, "hubble": data.hubble_deep_field,
        "immunohistochemistry": data.immunohistochemistry, "retina": data.retina, "moon": data.moon,
        "brick": data.brick, "grass": data.grass, "gravel": data.gravel,
        "china": lambda: load_sample_image("china.jpg"), "flower": lambda: load_sample_image("flower.jpg"),
    }
    for name, load in samples.items():
        if name not in found:
            found[name] = Image.fromarray(load()).convert("RGB")
    return found


def caption(image: Image.Image) -> Image.Image:
    w, h = image.size
    band = max(16, h // 8)
    out = Image.new("RGB", (w, h + band), "white")
    out.paste(image, (0, 0))
    ImageDraw.Draw(out).text((8, h + band // 4), "Holiday 2019 - scanned by the archive", fill="black")
    return out


def crop(image: Image.Image, left: float, top: float, right: float, bottom: float) -> Image.Image:
    w, h = image.size
    return image.crop((round(left * w), round(top * h), round(right * w), round(bottom * h)))


def resize(image: Image.Image, factor: float) -> Image.Image:
    w, h = image.size
    factor = min(factor, 3000 / max(w, h)) if factor > 1 else factor
    return image.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.Resampling.LANCZOS)


def write_set(folder: Path) -> dict[str, tuple[str, str]]:
    """Write the labelled files; return file name -> (original, kind)."""
    labels: dict[str, tuple[str, str]] = {}

    def save(image: Image.Image, name: str, original: str, kind: str, **options) -> None:
        image.save(folder / name, **options)
        labels[name] = (original, kind)

    for name, image in originals().items():
        save(image, f"{name}.jpg", name, "original", quality=92)
        (folder / f"{name}-copy.jpg").write_bytes((folder / f"{name}.jpg").read_bytes())
        labels[f"{name}-copy.jpg"] = (name, "copy")
        for factor in (0.3, 0.6, 2.0):
            save(resize(image, factor), f"{name}-x{factor}.jpg", name, POSITIVE, quality=90)
        for quality in (30, 60, 95):
            save(image, f"{name}-q{quality}.jpg", name, POSITIVE, quality=quality)
        save(image, f"{name}-re.png", name, POSITIVE)
        save(image, f"{name}-re.webp", name, POSITIVE, quality=80)
        save(crop(image, 0, 0, 0.9, 1), f"{name}-crop10.jpg", name, POSITIVE, quality=90)
        save(crop(image, 0.05, 0.05, 0.95, 0.95), f"{name}-crop5.jpg", name, POSITIVE, quality=90)
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 clockwise to display": undoes the turn below
        save(image.transpose(Image.Transpose.ROTATE_90), f"{name}-exif.jpg", name, POSITIVE, quality=90, exif=exif)
        for change in (1.15, 0.85):
            save(ImageEnhance.Brightness(image).enhance(change), f"{name}-b{change}.jpg", name, POSITIVE, quality=90)
        save(caption(image), f"{name}-caption.jpg", name, POSITIVE, quality=90)
        save(crop(image, 0, 0, 0.707, 0.707), f"{name}-keep50.jpg", name, NEGATIVE, quality=90)
        save(crop(image, 0.2, 0.2, 0.8, 0.8), f"{name}-keep36.jpg", name, NEGATIVE, quality=90)
        save(crop(image, 0, 0, 0.85, 1), f"{name}-pan-a.jpg", name, PAN, quality=90)
        save(crop(image, 0.15, 0, 1, 1), f"{name}-pan-b.jpg", name, PAN, quality=90)
        if name == "motorcycle_left":
            from skimage import data

            right = Image.fromarray(data.stereo_motorcycle()[1]).convert("RGB")
            save(right, f"{name}-right-frame.png", name, NEGATIVE)
    return labels


def label(a: tuple[str, str], b: tuple[str, str]) -> bool | None:
    """True: the same picture; False: not; None: unlabelled (a pan frame and its original)."""
    if a[0] != b[0]:
        return False
    kinds = {a[1], b[1]}
    if kinds <= {"original", "copy", POSITIVE}:
        return True
    if kinds == {PAN} or NEGATIVE in kinds:
        return False
    return None


def scores(tp: int, fp: int, fn: int) -> tuple[float, float]:
    return (tp / (tp + fp) if tp + fp else 1.0), (tp / (tp + fn) if tp + fn else 1.0)


def evaluate(model_name: str, folder: Path, labels: dict[str, tuple[str, str]], workdir: Path) -> dict:
    db_path = workdir / f"{model_name.replace(':', '-')}.db"
    store = Store(db_path)
    model = get_model(model_name).load()
    store.claim_model(model.model_id, model.dimensions, model.precision)
    upkeep = Upkeep(store, refresh_map=False)
    ingester = Ingester(store, model, on_batch=upkeep.after_batch)
    grouping = []  # seconds of each per-batch duplicates.update, which Upkeep calls
    update = duplicates.update

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return update(*args, **kwargs)
        finally:
            grouping.append(time.perf_counter() - started)

    duplicates.update = timed
    start = time.perf_counter()
    try:
        summary = ingester.add([str(folder / name) for name in sorted(labels)])
    finally:
        duplicates.update = update
    upkeep.join()
    seconds = time.perf_counter() - start
    assert summary.failed == 0, summary.line()

    rows = list(store.db.execute(
        "select i.id, i.path, i.sha256, v.vector, t.jpeg from images i join vectors v on v.image_id = i.id "
        "left join thumbnails t on t.image_id = i.id"
    ))
    ids = [r[0] for r in rows]
    names = {r[0]: Path(r[1]).name for r in rows}
    sha = {r[0]: r[2] for r in rows}
    layouts = [duplicates.layout(r[4]) for r in rows]
    vectors = np.stack([np.frombuffer(r[3], "<f4") for r in rows]).astype(np.float64)
    cosine = vectors @ vectors.T
    near_of = {}
    exact_of = {}
    for tier, target in (("near", near_of), ("exact", exact_of)):
        for group_id, image_id in store.db.execute(
            "select group_id, image_id from duplicate_groups where tier = ?", [tier]
        ):
            target[image_id] = group_id
    incremental = set(store.db.execute("select tier, group_id, image_id, is_keeper from duplicate_groups"))
    duplicates.regroup(store)
    same_as_scratch = incremental == set(
        store.db.execute("select tier, group_id, image_id, is_keeper from duplicate_groups")
    )

    near = [0, 0, 0]  # tp, fp, fn of the groups
    exact = [0, 0, 0]
    pairs = []  # cosine, layout similarity, truth, which half of the originals
    halves = {name: n % 2 for n, name in enumerate(sorted({o for o, _ in labels.values()}))}
    for (i, a), (j, b) in itertools.combinations(enumerate(ids), 2):
        truth = label(labels[names[a]], labels[names[b]])
        same_bytes = sha[a] == sha[b]
        exact_grouped = a in exact_of and exact_of.get(a) == exact_of.get(b)
        if same_bytes and exact_grouped:
            exact[0] += 1
        elif exact_grouped:
            exact[1] += 1
        elif same_bytes:
            exact[2] += 1
        if truth is None:
            continue
        grouped = a in near_of and near_of.get(a) == near_of.get(b)
        if truth and grouped:
            near[0] += 1
        elif grouped:
            near[1] += 1
        elif truth:
            near[2] += 1
        fold = halves[labels[names[a]][0]] if labels[names[a]][0] == labels[names[b]][0] else 2
        similar = duplicates.layout_similarity(layouts[i], layouts[j]) if cosine[i, j] >= 0.5 else -1.0
        pairs.append((cosine[i, j], similar, truth, fold))
    store.close()
    return {
        "model": model_name,
        "files": len(ids),
        "seconds": seconds,
        "grouping": grouping,
        "near": near,
        "exact": exact,
        "pairs": np.array(pairs),
        "config": duplicates.thresholds(model.model_id),
        "same_as_scratch": same_as_scratch,
        "positives": near[0] + near[2],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="efficientnet_lite0,inception_v3:random")
    args = parser.parse_args()
    one_blas_thread()  # as `collection add` and the watcher run the upkeep
    flags = cpu_flags()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "set"
        folder.mkdir()
        labels = write_set(folder)
        kinds = [kind for _, kind in labels.values()]
        print(f"command: {' '.join(sys.argv)}")
        print(f"CPU flags: {flags}; {os.cpu_count()} cores, shared machine")
        print(
            f"{len(labels)} files from {kinds.count('original')} originals: {kinds.count('copy')} exact copies, "
            f"{kinds.count(POSITIVE)} near-duplicates, {kinds.count(NEGATIVE) + kinds.count(PAN)} hard negatives\n"
        )
        results = [evaluate(name, folder, labels, Path(tmp)) for name in args.models.split(",")]

    print("| model | tier | rule | precision | recall | pairs found / labelled | per batch = from scratch |")
    print("| --- | --- | --- | ---: | ---: | ---: | --- |")
    for r in results:
        p, rc = scores(*r["exact"])
        print(f"| {r['model']} | exact | same sha256 | {p:.3f} | {rc:.3f} | {r['exact'][0]} / {r['exact'][0] + r['exact'][2]} | |")
        p, rc = scores(*r["near"])
        c = r["config"]
        print(
            f"| {r['model']} | near | cosine >= {c['near']:.2f}, layout >= {c['near_layout']:.2f} | {p:.3f} | {rc:.3f} | "
            f"{r['near'][0]} / {r['positives']} (+{r['near'][1]} wrong) | {'yes' if r['same_as_scratch'] else 'NO'} |"
        )
    for r in results:
        pairs = r["pairs"]
        batches = r["grouping"][1:]  # the first call groups the first batch from scratch
        print(f"\nPairwise, {r['model']} ({r['files']} files, added in {r['seconds']:.0f} s, of which "
              f"{sum(r['grouping']):.1f} s grouping: {1000 * np.median(batches):.0f} ms median per batch of "
              f"{r['files'] // len(r['grouping'])}): the cosine alone, and with the layout check\n")
        layout = r["config"]["near_layout"]
        print(f"| cosine >= | precision | recall | with layout >= {layout:.2f}: precision | recall |")
        print("| ---: | ---: | ---: | ---: | ---: |")
        for t in (0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90, 0.95):
            alone = pair_scores(pairs, t, -2.0)
            both = pair_scores(pairs, t, layout)
            print(f"| {t:.2f} | {alone[0]:.3f} | {alone[1]:.3f} | {both[0]:.3f} | {both[1]:.3f} |")
        print("\nHeld out: (cosine, layout) chosen on one half of the originals (highest recall at precision")
        print(">= 0.98), measured on the other half (pairs within one original; pairs across originals in both)\n")
        print("| chosen on | cosine | layout | precision | recall on the other half |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for fold in (0, 1):
            train = pairs[(pairs[:, 3] == fold) | (pairs[:, 3] == 2)]
            test = pairs[(pairs[:, 3] == 1 - fold) | (pairs[:, 3] == 2)]
            grid = [(t, h) for t in np.arange(0.60, 0.96, 0.05) for h in np.arange(0.20, 0.81, 0.05)]
            fits = [(pair_scores(train, t, h)[1], t, h) for t, h in grid if pair_scores(train, t, h)[0] >= 0.98]
            if not fits:
                print(f"| half {fold} | - | - | - | - |")
                continue
            _, t, h = max(fits)
            p, rc = pair_scores(test, t, h)
            print(f"| half {fold} | {t:.2f} | {h:.2f} | {p:.3f} | {rc:.3f} |")


def pair_scores(pairs: np.ndarray, cosine: float, layout: float) -> tuple[float, float]:
    chosen = (pairs[:, 0] >= cosine) & (pairs[:, 1] >= layout)
    truth = pairs[:, 2] == 1
    return scores(int((chosen & truth).sum()), int((chosen & ~truth).sum()), int((~chosen & truth).sum()))

if __name__ == "__main__":
    main()
