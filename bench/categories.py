"""Labels at every level at scale: storage per image, the cost of writing a batch, and
the queries the category pages, filter and facet run, on a synthetic collection.

    python bench/categories.py [--images 100000]

Each image gets a Dirichlet(0.02) softmax over the 1,000 classes (peaked on a few
unrelated classes, like a real photo's top-5), is stored with its distribution and
its categories at the default threshold, and 1 % are marked deleted. No model runs.
Prints a table; times are medians of 5 runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from collection import categories
from collection.store import Store
from machine import cpu_flags  # bench/machine.py, beside this script

DOG, ANIMAL = "n02084071", "n00015388"


def median_ms(run, times: int = 5) -> float:
    samples = []
    for _ in range(times):
        started = time.perf_counter()
        run()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    args = parser.parse_args()
    n = args.images
    rng = np.random.default_rng(0)
    folder = Path(tempfile.mkdtemp(prefix="bench-categories-"))
    store = Store(folder / "c.db")
    conn = store.db.conn
    at = store.category_threshold
    batch = 16
    write_seconds = 0.0
    for start in range(0, n, batch):
        count = min(batch, n - start)
        probs = rng.dirichlet(np.full(1000, 0.02), size=count).astype(np.float32)
        with store.db.atomic():
            ids = [
                conn.execute("insert into images (path, format) values (?, ?)",
                             [f"/photos/{start + i}.jpg", "JPEG" if (start + i) % 10 else "PNG"]).lastrowid
                for i in range(count)
            ]
            started = time.perf_counter()
            categories.save(conn, ids, probs, at)
            write_seconds += time.perf_counter() - started
    store.mark_deleted(range(1, n + 1, 100))
    store.db.execute("analyze")

    rows = conn.execute("select count(*) from image_categories").fetchone()[0]
    sizes = dict(conn.execute("select name, sum(pgsize) from dbstat group by name"))
    per_image = lambda *names: sum(sizes.get(name, 0) for name in names) / n  # noqa: E731
    dogs = conn.execute("select images from categories where wnid = ?", [DOG]).fetchone()[0]
    animals = conn.execute("select images from categories where wnid = ?", [ANIMAL]).fetchone()[0]
    filtered = "select * from images where format = 'PNG'"  # a tenth of the images
    wanted = {categories.FACET_PARAM: f'["{ANIMAL}"]'}
    results = [
        ("write a batch of 16 (distribution + categories)", f"{write_seconds / (n / batch) * 1000:.1f} ms"),
        ("categories stored per image", f"{rows / n:.1f}"),
        ("image_categories + its index, bytes per image",
         f"{per_image('image_categories', 'image_categories_wnid_score'):.0f}"),
        ("distributions, bytes per image", f"{per_image('distributions'):.0f}"),
        (f"ids of the dogs ({dogs:,} live)", f"{median_ms(lambda: categories.live_ids(conn, DOG)):.1f} ms"),
        (f"ids of the animals ({animals:,} live)", f"{median_ms(lambda: categories.live_ids(conn, ANIMAL)):.1f} ms"),
        ("best 60 animals (category page)", f"{median_ms(lambda: categories.top_images(conn, ANIMAL, 60)):.2f} ms"),
        ("/-/labels tree data (every category, 4 thumbnails each)",
         f"{median_ms(lambda: categories.tree(conn, 4)):.0f} ms"),
        ("images table filtered to dog: first 100 rows",
         f"{median_ms(lambda: conn.execute('select id from images where ' + categories.filter_sql('id', ['w']) + ' order by id limit 100', {'w': DOG}).fetchall()):.1f} ms"),
        ("facet, whole images table (kept counts), one level",
         f"{median_ms(lambda: conn.execute(categories.ALL_IMAGES_FACET_SQL, wanted).fetchall()):.2f} ms"),
        ("facet, a tenth of the images, one category",
         f"{median_ms(lambda: conn.execute(categories.facet_sql(filtered, 'id'), wanted).fetchall()):.0f} ms"),
        ("recompute at the same threshold (nothing to write), images/s",
         f"{n / (median_ms(lambda: categories.recompute(store.db, at), times=1) / 1000):,.0f}"),
        ("recompute at threshold 0.3 (rows removed), images/s",
         f"{n / (median_ms(lambda: categories.recompute(store.db, 0.3), times=1) / 1000):,.0f}"),
    ]
    store.close()
    print(f"{n:,} images, threshold {at:g}; CPU flags: {cpu_flags()}")
    print("| measure | value |\n| --- | ---: |")
    for name, value in results:
        print(f"| {name} | {value} |")
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()


if __name__ == "__main__":
    main()
