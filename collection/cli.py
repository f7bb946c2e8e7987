"""The `collection` command: each subcommand is a thin call into the modules."""

from __future__ import annotations

import os
from pathlib import Path

import click

from . import __version__
from .store import DEFAULT_DB, Store, StoreError

PROGRESS_FROM = 20  # files; fewer finish before a bar would help


def db_option(f):
    return click.option(
        "--db",
        "db_path",
        default=lambda: os.environ.get("COLLECTION_DB", DEFAULT_DB),
        show_default=DEFAULT_DB,
        type=click.Path(dir_okay=False),
        help="The collection database (env COLLECTION_DB).",
    )(f)


def model_options(f):
    from .models import AUTO, MODELS, PRECISIONS

    f = click.option(
        "--precision",
        type=click.Choice(PRECISIONS),
        default="fp32",
        show_default=True,
        help="Compute precision; bf16 is faster on CPUs with AMX and on GPUs.",
    )(f)
    f = click.option(
        "--weights",
        type=click.Path(dir_okay=False),
        default=None,
        help="A local weights file for the model (env COLLECTION_WEIGHTS).",
    )(f)
    return click.option(
        "--model",
        "model_name",
        default=AUTO,
        show_default=True,
        help=f"One of {', '.join(MODELS)}, or auto: the database's model, else "
        "inception_v3 when its weights can be had, else the offline efficientnet_lite0.",
    )(f)


def open_store(db_path: str, create: bool = True) -> Store:
    try:
        return Store(db_path, create=create)
    except StoreError as e:
        raise click.ClickException(str(e)) from None


def load_model(store: Store, name: str, weights: str | None, precision: str):
    """Resolve and build the model, turning every model problem into one clear line."""
    from .models import ModelError, choose

    try:
        model = choose(name, store.model, weights, precision, echo=lambda m: click.echo(m, err=True))
        store.claim_model(model.model_id, model.dimensions, model.precision)
        return model.load()
    except (ModelError, StoreError) as e:
        raise click.ClickException(str(e)) from None


@click.group()
@click.version_option(__version__, prog_name="collection")
def cli():
    """Find similar images and query what is in them.

    Images are run through an ImageNet model; each one's vector, top labels
    and metadata are stored in a SQLite collection you can browse in Datasette.
    """


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@db_option
@model_options
@click.option("-r", "--recursive", is_flag=True, help="Descend into subfolders.")
@click.option("--batch-size", type=click.IntRange(1, 1024), help="Images per model call.")
def add(paths, db_path, model_name, weights, precision, recursive, batch_size):
    """Add image files (or folders of them) to the collection.

    Unchanged files are skipped, renamed or copied files reuse their stored
    vector, and changed files are embedded again under the same id.
    """
    from .ingest import Ingester, iter_files

    store = open_store(db_path)
    files = list(iter_files(paths, recursive))
    if not files:
        raise click.ClickException("no image files found (use --recursive for subfolders)")
    model = load_model(store, model_name, weights, precision)
    ingester = Ingester(store, model, batch_size=batch_size)
    if len(files) >= PROGRESS_FROM:
        with click.progressbar(length=len(files), label="Adding", show_pos=True, file=click.get_text_stream("stderr")) as bar:
            summary = ingester.add(files, progress=bar.update)
    else:
        summary = ingester.add(files)
    click.echo(summary.line())
    if summary.failed:
        click.echo(f"See why with: collection failures --db {db_path}", err=True)


@cli.command()
@click.argument("image")
@db_option
def labels(image, db_path):
    """Show the stored labels of an image, by id or path."""
    store = open_store(db_path, create=False)
    row = store.by_id(int(image)) if image.isdigit() else store.by_path(os.path.abspath(image))
    if row is None:
        raise click.ClickException(f"no image {image!r} in {db_path}")
    click.echo(f"{row['id']}  {row['path']}")
    for label in store.labels_for(row["id"]):
        click.echo(f"  {label['rank']}. {label['label']:<30} {label['score']:.3f}  ({label['wnid']})")


@cli.command()
@db_option
def failures(db_path):
    """List files that could not be added, and why."""
    store = open_store(db_path, create=False)
    rows = list(store.db["failures"].rows_where(order_by="at desc"))
    for row in rows:
        click.echo(f"{row['path']}\n  {row['error']} (attempts: {row['attempts']}, last {row['at']})")
    if not rows:
        click.echo("No failures.")


@cli.command()
@db_option
def status(db_path):
    """Counts, model and size of the collection."""
    store = open_store(db_path, create=False)
    counts = store.counts()
    size = sum(
        Path(p).stat().st_size
        for p in (store.path, Path(f"{store.path}-wal"))
        if Path(p).exists()
    )
    click.echo(f"database:  {store.path} ({size / 1e6:.1f} MB)")
    click.echo(f"model:     {store.model or '(none yet)'} {store.get_meta('precision') or ''}".rstrip())
    click.echo(f"images:    {counts['images']}")
    click.echo(f"deleted:   {counts['deleted']}")
    click.echo(f"labels:    {counts['labels']} distinct")
    click.echo(f"failures:  {counts['failures']}")


@cli.command()
def models():
    """List the models, their vector size, input size and whether their weights are here."""
    from .models import MODELS

    click.echo(f"{'model':<20} {'dimensions':>10} {'input':>8}  weights")
    for name, cls in MODELS.items():
        model = cls(weights=os.environ.get("COLLECTION_WEIGHTS") if name == "inception_v3" else None)
        where = model.weights_available()
        if where is None and name == "inception_v3":
            where = "not here: downloaded by Keras on first use"
        click.echo(f"{name:<20} {cls.dimensions:>10} {cls.input_size:>5}px  {where}")
