"""The SQLite collection: schema as named migrations, upserts and reads, WAL mode."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import numpy as np
import sqlite_utils
from sqlite_utils.migrations import Migrations

DEFAULT_DB = "collection.db"

migrations = Migrations("collection")


@migrations()
def m001_initial(db: sqlite_utils.Database) -> None:
    db["images"].create(
        {
            "id": int,
            "path": str,
            "sha256": str,
            "size": int,
            "mtime": float,
            "width": int,
            "height": int,
            "format": str,
            "taken_at": str,
            "camera": str,
            "latitude": float,
            "longitude": float,
            "added_at": str,
            "updated_at": str,
            "model": str,
            "labels": str,
            "top_label": str,
            "top_score": float,
        },
        pk="id",
        not_null={"path"},
    )
    db["images"].create_index(["path"], unique=True)
    db["images"].create_index(["sha256"])
    db["labels"].create(
        {"image_id": int, "rank": int, "wnid": str, "label": str, "score": float},
        pk=("image_id", "rank"),
        foreign_keys=[("image_id", "images", "id")],
    )
    db["labels"].create_index(["label"])
    db["vectors"].create(
        {"image_id": int, "model": str, "vector": bytes},
        pk="image_id",
        foreign_keys=[("image_id", "images", "id")],
    )
    db["failures"].create(
        {"path": str, "error": str, "at": str, "attempts": int, "size": int, "mtime": float},
        pk="path",
    )
    db["collection_meta"].create({"key": str, "value": str}, pk="key")


@migrations()
def m002_deleted_and_thumbnails(db: sqlite_utils.Database) -> None:
    db["images"].add_column("deleted_at", str)
    db["images"].create_index(["deleted_at"])
    db["thumbnails"].create(
        {"image_id": int, "jpeg": bytes, "width": int, "height": int},
        pk="image_id",
        foreign_keys=[("image_id", "images", "id")],
    )


class StoreError(Exception):
    """The database cannot be used as asked; the message says why."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def encode(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype="<f4").tobytes()


def decode(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f4")


class Store:
    """One collection database. Not shared between threads: each opens its own."""

    def __init__(self, path: str | Path = DEFAULT_DB, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.exists():
            raise StoreError(f"no collection database at {self.path}")
        try:
            self.db = sqlite_utils.Database(self.path)
            self.db.execute("PRAGMA busy_timeout = 30000")
            self.db.enable_wal()
            self.db.execute("PRAGMA foreign_keys = ON")
            migrations.apply(self.db)
        except sqlite3.DatabaseError as e:
            raise StoreError(f"cannot open {self.path} as a collection database: {e}") from None

    def close(self) -> None:
        self.db.close()

    # --- collection-wide settings -------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("select value from collection_meta where key = ?", [key]).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value) -> None:
        self.db["collection_meta"].upsert({"key": key, "value": str(value)}, pk="key")

    @property
    def model(self) -> str | None:
        return self.get_meta("model")

    def claim_model(self, model_id: str, dimensions: int, precision: str) -> None:
        """Record the database's model, or refuse a different one: vectors never mix."""
        current = self.model
        if current is None:
            with self.db.atomic():
                self.set_meta("model", model_id)
                self.set_meta("dimensions", dimensions)
                self.set_meta("precision", precision)
        elif current != model_id:
            raise StoreError(
                f"{self.path} holds vectors from model {current!r}; adding with {model_id!r} "
                f"would mix two models' vectors. Use --model {current} (or auto), or a new --db."
            )
        elif self.get_meta("precision") != precision:
            raise StoreError(
                f"{self.path} was embedded at {self.get_meta('precision')} precision; "
                f"adding at {precision} would mix the two. Use --precision {self.get_meta('precision')}."
            )

    # --- reads --------------------------------------------------------------------

    def by_path(self, path: str) -> dict | None:
        rows = list(self.db["images"].rows_where("path = ?", [path], limit=1))
        return rows[0] if rows else None

    def by_id(self, image_id: int) -> dict | None:
        rows = list(self.db["images"].rows_where("id = ?", [image_id], limit=1))
        return rows[0] if rows else None

    def by_sha256(self, sha256: str) -> list[dict]:
        """Rows with this content that still have a vector, live ones first."""
        return list(
            self.db.query(
                "select images.* from images join vectors on vectors.image_id = images.id "
                "where sha256 = ? order by deleted_at is not null, id",
                [sha256],
            )
        )

    def labels_for(self, image_id: int) -> list[dict]:
        return list(self.db["labels"].rows_where("image_id = ?", [image_id], order_by="rank"))

    def vector(self, image_id: int) -> np.ndarray | None:
        row = self.db.execute("select vector from vectors where image_id = ?", [image_id]).fetchone()
        return decode(row[0]) if row else None

    def counts(self) -> dict:
        one = lambda sql: self.db.execute(sql).fetchone()[0]  # noqa: E731
        return {
            "images": one("select count(*) from images where deleted_at is null"),
            "deleted": one("select count(*) from images where deleted_at is not null"),
            "labels": one("select count(distinct label) from labels"),
            "failures": one("select count(*) from failures"),
        }

    # --- writes (callers group them in ``with store.db.atomic():``) ----------------

    def save_image(
        self,
        path: str,
        mtime: float,
        metadata: dict,
        vector: np.ndarray,
        labels: list[tuple[str, str, float]],
        model_id: str,
        thumbnail: tuple[bytes, int, int] | None = None,
    ) -> int:
        """Insert or update the image at ``path`` (keeping its id) with its vector and labels."""
        stamp = now()
        row = {
            "path": path,
            "mtime": mtime,
            **metadata,
            "updated_at": stamp,
            "model": model_id,
            "labels": json.dumps([label for _, label, _ in labels]),
            "top_label": labels[0][1] if labels else None,
            "top_score": labels[0][2] if labels else None,
            "deleted_at": None,
        }
        existing = self.by_path(path)
        if existing:
            image_id = existing["id"]
            self.db["images"].update(image_id, row)
        else:
            row["added_at"] = stamp
            image_id = self.db["images"].insert(row).last_pk
        self._save_vector_and_labels(image_id, vector, labels, model_id)
        if thumbnail:
            self.save_thumbnail(image_id, *thumbnail)
        return image_id

    def _save_vector_and_labels(self, image_id, vector, labels, model_id) -> None:
        self.db["vectors"].upsert(
            {"image_id": image_id, "model": model_id, "vector": encode(vector)}, pk="image_id"
        )
        self.db.execute("delete from labels where image_id = ?", [image_id])
        self.db["labels"].insert_all(
            {"image_id": image_id, "rank": rank, "wnid": wnid, "label": label, "score": score}
            for rank, (wnid, label, score) in enumerate(labels, start=1)
        )

    def save_thumbnail(self, image_id: int, jpeg: bytes, width: int, height: int) -> None:
        self.db["thumbnails"].upsert(
            {"image_id": image_id, "jpeg": jpeg, "width": width, "height": height}, pk="image_id"
        )

    def move(self, image_id: int, path: str, mtime: float) -> None:
        """The same content under a new path: same id, vector and labels; no model run."""
        existing = self.by_path(path)
        if existing and existing["id"] != image_id:
            self.delete_rows([existing["id"]])
        self.db["images"].update(
            image_id, {"path": path, "mtime": mtime, "deleted_at": None, "updated_at": now()}
        )

    def copy(self, source_id: int, path: str, mtime: float) -> int:
        """A second file with known content: a new row that reuses the source's vector and labels."""
        source = self.by_id(source_id)
        metadata = {k: source[k] for k in ("sha256", "size", "width", "height", "format",
                                            "taken_at", "camera", "latitude", "longitude")}
        labels = [(r["wnid"], r["label"], r["score"]) for r in self.labels_for(source_id)]
        thumb = self.db.execute(
            "select jpeg, width, height from thumbnails where image_id = ?", [source_id]
        ).fetchone()
        return self.save_image(
            path, mtime, metadata, self.vector(source_id), labels, source["model"], thumb
        )

    def touch(self, image_id: int, mtime: float) -> None:
        """Same path, same content, new mtime (e.g. `touch`, a copy that kept the bytes)."""
        self.db["images"].update(image_id, {"mtime": mtime, "deleted_at": None})

    def mark_deleted(self, image_ids: Iterable[int]) -> None:
        stamp = now()
        for image_id in image_ids:
            self.db["images"].update(image_id, {"deleted_at": stamp})

    def delete_rows(self, image_ids: Iterable[int]) -> None:
        for image_id in image_ids:
            for table in ("labels", "vectors", "thumbnails"):
                self.db.execute(f"delete from {table} where image_id = ?", [image_id])
            self.db.execute("delete from images where id = ?", [image_id])

    def record_failure(self, path: str, error: str, size: int | None, mtime: float | None) -> None:
        previous = self.db.execute("select attempts from failures where path = ?", [path]).fetchone()
        self.db["failures"].upsert(
            {
                "path": path,
                "error": error,
                "at": now(),
                "attempts": (previous[0] if previous else 0) + 1,
                "size": size,
                "mtime": mtime,
            },
            pk="path",
        )

    def failure(self, path: str) -> dict | None:
        rows = list(self.db["failures"].rows_where("path = ?", [path], limit=1))
        return rows[0] if rows else None

    def clear_failure(self, path: str) -> None:
        self.db.execute("delete from failures where path = ?", [path])
