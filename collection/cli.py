"""The `collection` command: each subcommand is a thin call into the modules."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

import click

from . import __version__
from .search import MAX_K
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
    from .runtimes import RUNTIMES

    f = click.option(
        "--runtime",
        type=click.Choice(RUNTIMES),
        default=lambda: os.environ.get("COLLECTION_RUNTIME", AUTO),
        show_default=AUTO,
        help="What runs the model (env COLLECTION_RUNTIME): auto is TensorFlow when it sees a GPU, "
        "else OpenVINO (faster on CPUs), else TensorFlow. Same vectors at fp32.",
    )(f)
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


def limit_options(f):
    """--max-bytes and --max-pixels: what a file may hold before it is refused unread."""
    from .files import MAX_BYTES, MAX_PIXELS

    f = click.option(
        "--max-pixels",
        type=click.IntRange(1),
        default=MAX_PIXELS,
        show_default=True,
        envvar="COLLECTION_MAX_PIXELS",
        help="Refuse an image whose header claims more pixels, before decoding it.",
    )(f)
    return click.option(
        "--max-bytes",
        type=click.IntRange(1),
        default=MAX_BYTES,
        show_default=True,
        envvar="COLLECTION_MAX_BYTES",
        help="Refuse a file bigger than this, unread.",
    )(f)


def open_store(db_path: str, create: bool = True) -> Store:
    try:
        return Store(db_path, create=create)
    except StoreError as e:
        raise click.ClickException(str(e)) from None


def check_upkeep_settings(store: Store) -> None:
    """The settings each batch's upkeep reads from the environment (duplicate thresholds),
    checked before any work starts: a bad one is one clear line, not an error per batch."""
    from .duplicates import DuplicatesError, thresholds

    try:
        thresholds(store.model)
    except DuplicatesError as e:
        raise click.ClickException(str(e)) from None


def load_model(store: Store, name: str, weights: str | None, precision: str, runtime: str | None = None):
    """Resolve and build the model, turning every model problem into one clear line."""
    from .models import ModelError, choose

    runtime = runtime or os.environ.get("COLLECTION_RUNTIME", "auto")

    def say(line: str) -> None:
        click.echo(line, err=True)

    try:
        model = choose(name, store.model, weights, precision, echo=say, runtime=runtime)
        store.claim_model(model.model_id, model.dimensions, model.precision)
        return model.load(echo=say)
    except (ModelError, StoreError) as e:
        raise click.ClickException(str(e)) from None


def collection_model(store: Store, weights: str | None = None):
    """The model the collection's vectors came from (its name and precision), loaded to
    embed more images like them."""
    from .models import AUTO

    return load_model(store, AUTO, weights, store.get_meta("precision") or "fp32")


def image_row(store: Store, image: str, db_path: str) -> dict:
    """The images row an argument names, by id or path; a clear error when there is none."""
    row = store.by_id(int(image)) if image.isdigit() else store.by_path(os.path.abspath(image))
    if row is None:
        raise click.ClickException(f"no image {image!r} in {db_path}")
    return row


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("--batch-size", type=click.IntRange(1, 1024), help="Images per model call [default: the model's, 16].")
@limit_options
def add(paths, db_path, model_name, weights, precision, runtime, recursive, batch_size, max_bytes, max_pixels):
    """Add image files (or folders of them) to the collection.

    Unchanged files are skipped, renamed or copied files reuse their stored
    vector, and changed files are embedded again under the same id. Files that
    failed before are tried again. Only regular files are read, and a symlink
    only when it leads to a file inside the folder named (or the named file's).
    """
    from .ingest import folders_of, iter_files

    store = open_store(db_path)
    files = list(iter_files(paths, recursive))
    if not files:
        raise click.ClickException("no image files found (use --recursive for subfolders)")
    return _add_files(store, files, folders_of(paths), model_name, weights, precision, runtime, batch_size, max_bytes, max_pixels)


def _add_files(store, files, folders, model_name, weights, precision, runtime, batch_size, max_bytes, max_pixels):
    """Run ``files`` through the model into ``store``, retrying earlier failures; print the summary."""
    from .files import Limits
    from .ingest import Ingester, upkeep_behind

    from .search import one_blas_thread

    one_blas_thread()
    started = time.perf_counter()
    check_upkeep_settings(store)
    model = load_model(store, model_name, weights, precision, runtime)
    # Matches, duplicates and the index catch up after each batch on a thread of their
    # own, while the next batch is decoded and embedded.
    upkeep = upkeep_behind(store.path, refresh_map=False)
    try:
        ingester = Ingester(
            store,
            model,
            batch_size=batch_size,
            on_batch=upkeep,
            folders=folders,
            limits=Limits(max_bytes, max_pixels),
            retry_failed=True,
        )
        if len(files) >= PROGRESS_FROM:
            with click.progressbar(length=len(files), label="Adding", show_pos=True, file=click.get_text_stream("stderr")) as bar:
                summary = ingester.add(files, progress=bar.update)
        else:
            summary = ingester.add(files)
    finally:
        upkeep.close()
    store.log_ingest(
        {"source": "add", "files": summary.seen, "added": summary.added, "updated": summary.updated,
         "reused": summary.reused, "unchanged": summary.unchanged, "failed": summary.failed,
         "seconds": round(time.perf_counter() - started, 3), "runtime": model.runtime_version}
    )
    click.echo(summary.line())
    if summary.failed:
        click.echo(f"See why with: collection failures --db {store.path}", err=True)
    return summary


@cli.command()
@click.argument("image")
@db_option
def labels(image, db_path):
    """Show the stored labels of an image, by id or path."""
    store = open_store(db_path, create=False)
    row = image_row(store, image, db_path)
    click.echo(f"{row['id']}  {row['path']}")
    for label in store.labels_for(row["id"]):
        click.echo(f"  {label['rank']}. {label['label']:<30} {label['score']:.3f}  ({label['wnid']})")


@cli.command()
@db_option
def failures(db_path):
    """List files that could not be added, why, and when each is tried next."""
    store = open_store(db_path, create=False)
    rows = list(store.db["failures"].rows_where(order_by="at desc"))
    for row in rows:
        when = row["next_try"] or "when the file changes"
        click.echo(
            f"{row['path']}\n  {row['error']} (attempts: {row['attempts']}, last {row['at']}; "
            f"next try: {when}, or now with `collection retry`)"
        )
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
    _runtimes_table()


def _runtimes_table() -> None:
    """Each runtime and precision with its measured agreement with TensorFlow fp32."""
    from .runtimes import AGREEMENT, DEFAULT_BARS, RuntimeUnavailable, openvino_version

    try:
        openvino = f"OpenVINO {openvino_version()} loads here"
    except RuntimeUnavailable as e:
        openvino = str(e)
    click.echo(f"\nruntimes: tensorflow, openvino ({openvino}); --runtime auto picks TensorFlow on a GPU, else OpenVINO.")
    click.echo("Agreement with TensorFlow fp32 (efficientnet_lite0, real photos, bench/ingest.py):")
    click.echo(f"{'runtime':<12} {'precision':<10} {'top-1':>6} {'10-NN':>6} {'min cos':>9}  (bars for a default: 0.99, 0.95)")
    for (runtime, precision), (top1, overlap, cosine) in AGREEMENT.items():
        fit = top1 >= DEFAULT_BARS[0] and overlap >= DEFAULT_BARS[1]
        verdict = "default" if precision == "fp32" else ("may be chosen" if fit else "offered, never a default")
        click.echo(f"{runtime:<12} {precision:<10} {top1:>6.3f} {overlap:>6.3f} {cosine:>9.5f}  {verdict}")


@cli.command()
@db_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind; 0.0.0.0 makes the collection reachable from other machines.")
@click.option("-p", "--port", default=8001, show_default=True, type=click.IntRange(1, 65535),
              help="Port to listen on.")
@click.option("--metadata", "metadata_path", type=click.Path(exists=True, dir_okay=False),
              help="Datasette metadata file  [default: the project's metadata.yml]")
@click.option("--access-log/--no-access-log", default=False, show_default=True,
              help="Log every request (off by default: a page of thumbnails is dozens).")
def serve(db_path, host, port, metadata_path, access_log):
    """Browse the collection in Datasette: gallery, image pages, similar images, map, status."""
    from . import serve as serving

    if not Path(db_path).exists():
        raise click.ClickException(f"no collection database at {db_path}")
    open_store(db_path).close()  # upgrade an older database before Datasette reads it
    metadata_path = metadata_path or serving.find_metadata()
    if metadata_path is None:
        click.echo("metadata.yml not found: serving without titles, facets or canned queries", err=True)
    serving.run(db_path, host, port, metadata_path, access_log=access_log)


def watch_options(f):
    """The options `watch` and `start` share."""
    f = click.option(
        "--ignore",
        multiple=True,
        metavar="PATTERN",
        help="Also leave alone files or folders matching this glob (repeatable). Hidden files, "
        "partial downloads, editors' swap files and @eaDir folders always are.",
    )(f)
    f = click.option(
        "--rescan-every",
        type=click.FloatRange(min=1),
        default=600,
        show_default=True,
        metavar="SECONDS",
        help="Rescan the whole folder this often, for anything the events missed.",
    )(f)
    f = click.option(
        "--poll",
        is_flag=True,
        help="Poll the folder instead of waiting for OS events: for network drives (NFS, SMB).",
    )(f)
    f = click.option("--batch-size", type=click.IntRange(1, 1024), help="Images per model call [default: the model's, 16].")(f)
    return limit_options(model_options(db_option(f)))


def _watcher(folder, db_path, model_name, weights, precision, runtime, poll, rescan_every, ignore, batch_size,
             max_bytes, max_pixels, status=None):
    from .files import Limits
    from .ingest import IGNORE
    from .models import serialised
    from .watcher import StatusLine, Watcher

    from .search import one_blas_thread

    one_blas_thread()
    status = status or StatusLine()
    store = open_store(db_path)
    check_upkeep_settings(store)
    # Shared with the image-search channel (embedder.serving): one forward pass at a time.
    model = serialised(load_model(store, model_name, weights, precision, runtime))
    store.close()
    watcher = Watcher(
        folder,
        db_path,
        model,
        poll=poll,
        rescan_every=rescan_every,
        ignore=IGNORE + tuple(ignore),
        batch_size=batch_size,
        limits=Limits(max_bytes, max_pixels),
        echo=status.say,
        report=status.update,
    )
    return watcher, status


def _relay(lines, say) -> None:
    for line in lines:
        say(line.rstrip())


def _stop_with_parent() -> None:
    """In the server's process: SIGTERM when `collection start` dies, even by kill -9 (Linux)."""
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


@cli.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@watch_options
def watch(folder, **options):
    """Keep the collection in step with FOLDER and its subfolders, until Ctrl-C.

    First adds what is new or changed and marks deleted what has gone, then adds
    each image dropped in within seconds, once it is completely written. Renamed
    and moved files keep their id and run no model. Hidden files, partial
    downloads and editors' temporary files are left alone. Meanwhile its model
    also answers searches by an image (`collection similar FILE`, the browser's
    upload search) over a socket next to the database that only you can reach.
    """
    from .embedder import serving
    from .watcher import StatusLine, run_until_stopped

    status = StatusLine()
    # The image-search channel is claimed before the model loads: a search meanwhile waits for it.
    with serving(options["db_path"], echo=status.say) as channel:
        watcher, status = _watcher(folder, status=status, **options)
        channel.model = watcher.model
        run_until_stopped(watcher)
    status.close()


@cli.command()
@click.argument("folder", type=click.Path(file_okay=False))
@watch_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface Datasette binds.")
@click.option("-p", "--port", default=8001, show_default=True, type=click.IntRange(1, 65535),
              help="Port Datasette listens on.")
def start(folder, host, port, **options):
    """Watch FOLDER (created if missing) and serve the collection in Datasette.

    The same as `collection watch FOLDER` and `collection serve` together;
    Ctrl-C stops both.
    """
    import signal
    import subprocess
    import sys
    import threading

    from .embedder import serving
    from .watcher import StatusLine, run_until_stopped

    # SIGTERM stops the server too, even while the model loads: it becomes KeyboardInterrupt.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    Path(folder).mkdir(parents=True, exist_ok=True)
    db_path = options["db_path"]
    open_store(db_path).close()  # Datasette needs the database, created and upgraded
    # Request lines are left out: the status line is the terminal's one account of the work.
    server = subprocess.Popen(
        [sys.executable, "-m", "collection", "serve", "--db", db_path, "--host", host, "--port", str(port),
         "--no-access-log"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_stop_with_parent if sys.platform.startswith("linux") else None,
    )
    try:
        status = StatusLine()
        # Relayed from the first byte, before the model loads: a pipe left unread fills
        # and stalls the server. Its lines go above the status line, not through it.
        threading.Thread(target=_relay, args=(server.stdout, status.say), daemon=True).start()
        with serving(db_path, echo=status.say) as channel:
            watcher, status = _watcher(folder, status=status, **options)
            channel.model = watcher.model
            shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
            click.echo(
                f"Open http://{shown}:{port}/ to browse the collection; "
                f"drop images into {watcher.root} (Ctrl-C stops both)",
                err=True,
            )
            run_until_stopped(watcher, alive=lambda: server.poll() is None)
        status.close()
    finally:
        exited = server.poll()
        if exited is None:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    if exited:
        raise click.ClickException(
            f"Datasette exited with code {exited} (is port {port} in use?), so watching stopped too"
        )


@cli.command(name="map")
@db_option
@click.option(
    "--method",
    type=click.Choice(["auto", "tsne", "pca"]),
    default="auto",
    show_default=True,
    help="t-SNE (after PCA to 50 dimensions) or PCA alone; auto gives t-SNE a sample of "
    "10,000 images in larger collections and places the rest near their neighbours.",
)
@click.option("--perplexity", type=click.FloatRange(2, 100), default=30.0, show_default=True,
              help="t-SNE's perplexity: roughly how many neighbours each image keeps close.")
def map_(db_path, method, perplexity):
    """Lay out every image on a 2-D map (t-SNE or PCA) for the /-/map page.

    Images added later are placed near their neighbours at once; run this
    again to recompute the whole map.
    """
    from .projection import ProjectionError, project

    store = open_store(db_path, create=False)
    try:
        result = project(store, method, perplexity, echo=lambda m: click.echo(m, err=True))
    except ProjectionError as e:
        raise click.ClickException(str(e)) from None
    click.echo(result.line())


@cli.command()
@click.argument("image")
@click.option("-k", "k", type=click.IntRange(1, MAX_K), default=10, show_default=True,
              help=f"How many to show (at most {MAX_K}).")
@click.option("--min-score", type=click.FloatRange(-1.0, 1.0), default=0.0, show_default=True,
              help="Leave out images less similar than this (cosine).")
@click.option("--json", "as_json", is_flag=True, help="Output JSON.")
@db_option
def similar(image, k, min_score, as_json, db_path):
    """Images most like IMAGE: an id or path in the collection, or any image file.

    A file outside the collection is run through the collection's model on the
    fly; it is not added. A running watcher daemon (`collection watch` or
    `collection start`) embeds it in well under a second; without one, the model
    is loaded here for this one file.
    """
    import json

    from .index import open_index

    store = open_store(db_path, create=False)
    searcher = open_index(db_path)
    row = store.by_id(int(image)) if image.isdigit() and not os.path.exists(image) else store.by_path(os.path.abspath(image))
    if row is not None and row["deleted_at"] is None:
        found = searcher.similar(row["id"], k, min_score)
    elif os.path.isfile(image):
        embedding = _embed_file(store, image, db_path)
        if not as_json:
            where = {"daemon": "the watcher daemon", "worker": "the embedding worker"}.get(embedding.via, "this process")
            click.echo(f"Embedded by {where} in {embedding.seconds:.2f} s", err=True)
        found = searcher.similar_to_vector(embedding.vector, k, min_score)
    else:
        raise click.ClickException(f"no image {image!r} in {db_path}, and no such file")
    paths = dict(store.db.execute(
        "select id, path from images where id in (select value from json_each(?))", [json.dumps([i for i, _ in found])]
    ))
    if as_json:
        click.echo(json.dumps([{"id": i, "score": round(s, 6), "path": paths.get(i)} for i, s in found], indent=2))
    else:
        for image_id, score in found:
            click.echo(f"{score:.4f}  {image_id:>6}  {paths.get(image_id)}")
        if not found:
            click.echo("No similar images.", err=True)


def _embed_file(store: Store, path: str, db_path: str):
    """The Embedding of an image file that is not in the collection, from its model: by the
    watcher daemon when one runs, else loaded here (quicker for one file than starting a
    worker, and nothing is left running)."""
    from . import files
    from .embedder import EmbedError, NoServer, compute, embed

    if store.model is None:
        raise click.ClickException("the collection is empty: add images first")
    try:
        data, _ = files.read(path, None)
    except files.Unreadable as e:
        raise click.ClickException(f"{path}: {e}") from None
    try:
        try:
            embedding = embed(db_path, data, start_worker=False, max_bytes=files.MAX_BYTES)
        except NoServer:
            embedding = compute(collection_model(store), data)
    except EmbedError as e:
        raise click.ClickException(f"{path}: {e.message}") from None
    return embedding


@cli.command(name="index")
@db_option
@click.option("--trees", type=click.IntRange(1, 1000), default=None,
              help="Annoy trees: more give better recall, a bigger file and a slower build.")
def index_command(db_path, trees):
    """Rebuild the similar-images index into one segment now, and bring the matches table
    up to date (filling it, if it never was, in the foreground)."""
    from .index import N_TREES, build
    from .matches import fill, update_matches
    from .search import one_blas_thread

    one_blas_thread()  # as in `add`: filling matches is many small products
    store = open_store(db_path, create=False)
    result = build(db_path, n_trees=trees or N_TREES, full=True)
    if result["built"]:
        click.echo(
            f"Indexed {result['built']['items']} images ({result['index_model']}, "
            f"{result['built']['n_trees']} trees) in {result['seconds']:.1f}s: {result['path']}"
        )
    else:
        click.echo("No images to index.")
    written = fill(store) if store.get_meta("matches_seq") is None else update_matches(store)
    click.echo(f"Matches: {written} lists updated")


@cli.command()
@db_option
@click.option("--tier", type=click.Choice(["exact", "near", "similar"]), default="near", show_default=True,
              help="exact: the same bytes; near: the same picture resized, re-encoded or lightly "
              "edited; similar: look-alikes such as burst shots.")
@click.option("--json", "as_json", is_flag=True, help="Output JSON: one object per image in a group.")
@click.option("--csv", "as_csv", is_flag=True, help="Output CSV: one row per image in a group.")
def duplicates(db_path, tier, as_json, as_csv):
    """List duplicate groups with their suggested keeper, for review or scripts.

    Each image in a group has a role: keeper (the suggested one, or the one a
    reviewer chose to keep), duplicate, not_duplicate or ignored (decisions made
    on the /-/duplicates page). Nothing is deleted or moved: for example
    `--csv` and the rows whose role is duplicate give files to remove by hand.
    Thresholds come from COLLECTION_NEAR_DUPLICATE and COLLECTION_SIMILAR.
    """
    import csv
    import json
    import sys

    from . import duplicates as dups
    from .search import one_blas_thread

    one_blas_thread()  # as in `add`: a regrouping's searches and layouts are small products
    if as_json and as_csv:
        raise click.UsageError("choose one of --json and --csv")
    store = open_store(db_path, create=False)
    try:
        # catch up with anything written since the last batch's upkeep; a collection never
        # grouped is grouped here (the watcher would do it in the background)
        dups.update(store, background=False)
    except dups.DuplicatesError as e:
        raise click.ClickException(str(e)) from None
    columns = ("tier", "group_id", "image_id", "role", "decision", "score", "path", "width", "height",
               "size", "format", "taken_at")
    members = ({**m, "tier": tier} for m in dups.listing(store.db.conn, tier))
    if as_json:
        click.echo(json.dumps([{c: m[c] for c in columns} for m in members], indent=2))
    elif as_csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([m[c] for c in columns] for m in members)
    else:
        shown = 0
        for m in members:
            if m["group_id"] != shown:
                shown = m["group_id"]
                click.echo(f"{tier} group {shown}")
            size = f"{m['width']}x{m['height']}"
            click.echo(f"  {m['role']:<13} {m['image_id']:>7}  {size:>11}  {m['size'] or 0:>11,} B  "
                       f"{m['score']:.3f}  {m['path']}")
        total = dups.summary(store.db.conn)[tier]
        click.echo(f"{total['groups']:,} {tier} groups, {total['images']:,} images, "
                   f"{total['wasted_bytes']:,} bytes outside the suggested keepers", err=True)
@cli.group(name="categories")
def categories_group():
    """Labels at every level: the WordNet categories above the ImageNet classes.

    A category's score is the sum of its classes' probabilities ("dog" sums every
    breed); each image keeps every category scoring at least the threshold.
    """


@categories_group.command(name="recompute")
@db_option
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True),
              help="Keep categories scoring at least this from now on [default: the collection's, else 0.2].")
@click.option("--embed/--no-embed", default=True, show_default=True,
              help="Run the model over images stored without a distribution (added before categories existed).")
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="A local weights file for the model (env COLLECTION_WEIGHTS).")
def categories_recompute(db_path, threshold, embed, weights):
    """Recompute every image's categories from its stored class probabilities.

    Images added before categories existed have none stored: they are run through
    the collection's model again (a batch per transaction, so the watcher and the
    server carry on meanwhile), unless --no-embed.
    """
    from . import categories

    store = open_store(db_path, create=False)
    if threshold is not None:
        store.set_meta(categories.THRESHOLD_KEY, threshold)
    at = store.category_threshold
    stored = store.db.execute("select count(*) from distributions").fetchone()[0]
    with _progress(stored, "Recomputing") as update:
        done = categories.recompute(store.db, at, progress=update)
    click.echo(f"Recomputed the categories of {done} images at threshold {at:g}")
    missing = categories.count_without_distribution(store.db.conn)
    if not missing:
        return
    if not embed:
        click.echo(f"{missing} images have no stored class probabilities: run this without --no-embed "
                   "to run the model over them")
        return
    model = collection_model(store, weights or os.environ.get("COLLECTION_WEIGHTS"))
    click.echo(f"{missing} images have no stored class probabilities: running {model.model_id} over them", err=True)
    with _progress(missing, "Embedding") as update:
        done, skipped = categories.reembed(store.db, model, at, progress=update)
    click.echo(f"Embedded {done} images again; {skipped} skipped (file gone or changed since added)")


@categories_group.command(name="show")
@click.argument("image")
@db_option
def categories_show(image, db_path):
    """The stored categories of an image, by id or path, most general first."""
    from .categories import hierarchy

    store = open_store(db_path, create=False)
    row = image_row(store, image, db_path)
    h = hierarchy()
    found = store.db.execute("select wnid, score from image_categories where image_id = ?", [row["id"]]).fetchall()
    click.echo(f"{row['id']}  {row['path']}")
    for wnid, score in sorted(found, key=lambda f: (-round(f[1], 3), h.depth[f[0]])):
        click.echo(f"  {score:.3f}  {'  ' * h.depth[wnid]}{h.categories[wnid].name}  ({wnid})")
    if not found:
        click.echo("  (none stored: see `collection categories recompute`)")


@categories_group.command(name="search")
@click.argument("words")
@db_option
def categories_search(words, db_path):
    """Categories WordNet knows by WORDS (any synonym: "canine", "automobile"), with image counts."""
    from .categories import hierarchy

    store = open_store(db_path, create=False)
    for category, word in hierarchy().search(words)[:20]:
        count = store.db.execute("select images from categories where wnid = ?", [category.wnid]).fetchone()[0]
        click.echo(f"{count:>7}  {category.name}  ({category.wnid}; {'; '.join(category.lemmas)})")


@contextmanager
def _progress(total: int, label: str):
    """A progress bar on stderr for long work, else a no-op; yields its update function."""
    if total < PROGRESS_FROM:
        yield lambda n: None
        return
    with click.progressbar(length=total, label=label, show_pos=True, file=click.get_text_stream("stderr")) as bar:
        yield bar.update
def _require(module: str, engine: str) -> None:
    """A clear line, not a traceback, when an optional dependency is absent."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise click.ClickException(f"{engine} needs {module}, which is not installed here: pip install 'collection[ray]'")


@cli.command()
@click.argument("source")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for the Parquet shards: on storage every Ray node reaches at the same path.")
@click.option("--engine", type=click.Choice(["ray"]), default="ray", show_default=True,
              help="The distributed engine that runs the pipeline.")
@click.option("--address", default=None, metavar="ADDRESS",
              help="The Ray cluster to run on (e.g. auto, or ray://head:10001; env RAY_ADDRESS). "
              "Without it, a local Ray on this machine's cores.")
@db_option
@model_options
@click.option("--batch-size", type=click.IntRange(1, 1024), help="Images per model call [default: the model's, 16].")
@click.option("--actors", type=click.IntRange(1), default=None,
              help="Model actors [default: one per GPU; on a cluster without GPUs, one per node].")
@click.option("--shard-rows", type=click.IntRange(1), default=None,
              help="Files per shard [default: 1000].")
@limit_options
def backfill(
    source, out, engine, address, db_path, model_name, weights, precision, runtime, batch_size, actors, shard_rows,
    max_bytes, max_pixels,
):
    """Embed every image under SOURCE on a Ray cluster, into Parquet shards in --out.

    SOURCE is a folder every node reaches at the same path, or a pyarrow.fs URI
    (s3://bucket/photos, gs://..., file:///...).

    Decoding runs as tasks on every CPU of the cluster and the model in one actor per
    GPU (or per node), with the same model code and weights as `collection add`.
    Files already in the shards, or in the collection --db (when it exists), are
    skipped: run it again after an interruption. Then merge the shards with
    `collection import`.
    """
    _require("ray", "collection backfill")
    from .backfill import SHARD_ROWS, EngineError, ModelSpec, file_table, run
    from .files import Limits
    from .models import ModelError, choose
    from .sources import Source, SourceError

    try:
        where = Source.of(source, Limits(max_bytes, max_pixels))
    except SourceError as e:
        raise click.ClickException(str(e)) from None

    store = open_store(db_path) if Path(db_path).exists() else None
    try:
        model = choose(
            model_name, store and store.model, weights, precision, echo=lambda m: click.echo(m, err=True), runtime=runtime
        )
        if store and store.model:
            store.claim_model(model.model_id, model.dimensions, model.precision)
    except (ModelError, StoreError) as e:
        raise click.ClickException(str(e)) from None
    if model.weights_available() is None:
        raise click.ClickException(f"the weights of {model.model_id} are not here: see `collection models`")
    try:
        summary = run(
            where,
            out,
            ModelSpec.of(model),
            done=file_table(store.file_states()) if store else None,
            address=address,
            batch_size=batch_size,
            actors=actors,
            shard_rows=shard_rows or SHARD_ROWS,
            echo=lambda m: click.echo(m, err=True),
        )
    except EngineError as e:
        raise click.ClickException(str(e)) from None
    click.echo(summary.line())
    if summary.embedded or summary.failed:
        click.echo(f"Merge them with: collection import {out} --db {db_path}", err=True)


@cli.command(name="import")
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@db_option
def import_(folder, db_path):
    """Merge the shards a `collection backfill` wrote to FOLDER into the collection.

    Rows go through the same writes as `collection add`, with the same model checks;
    an image keeps its id, and importing the same shards again changes nothing.
    The similar-images index, matches and map catch up as after a large add.
    """
    _require("pyarrow", "collection import")
    from .search import one_blas_thread
    from .shards import count_rows, import_shards
    from .upkeep import Upkeep

    one_blas_thread()  # as in `add`: the upkeep's many small products, on two busy cores
    store = open_store(db_path)
    check_upkeep_settings(store)
    upkeep = Upkeep(store, refresh_map=False)
    try:
        with click.progressbar(length=count_rows(folder), label="Importing", show_pos=True,
                               file=click.get_text_stream("stderr")) as bar:
            summary = import_shards(store, folder, after_batch=upkeep.after_batch, progress=bar.update)
    except StoreError as e:
        raise click.ClickException(str(e)) from None
    finally:
        upkeep.join()
    click.echo(summary.line())


@cli.command()
@click.argument("paths", nargs=-1, type=click.Path())
@db_option
@model_options
@click.option("--batch-size", type=click.IntRange(1, 1024), help="Images per model call [default: the model's, 16].")
@limit_options
def retry(paths, db_path, model_name, weights, precision, runtime, batch_size, max_bytes, max_pixels):
    """Try every failed file again now (or those at or under PATHS).

    Failures whose files have gone are cleared. A watcher retries on its own when
    a file changes or, for a cause that can pass (permissions), when it is due.
    """
    store = open_store(db_path, create=False)
    prefixes = [os.path.abspath(p) for p in paths]
    chosen = [
        path for path in (r[0] for r in store.db.execute("select path from failures order by path"))
        if not prefixes or any(path == p or path.startswith(os.path.join(p, "")) for p in prefixes)
    ]
    there = [path for path in chosen if os.path.lexists(path)]
    gone = len(chosen) - len(there)
    if gone:
        with store.db.atomic():
            for path in chosen:
                if not os.path.lexists(path):
                    store.clear_failure(path)
        click.echo(f"{gone} failure{'s' * (gone != 1)} cleared: the file has gone", err=True)
    if not there:
        click.echo("No failures to retry.")
        return
    _add_files(store, there, None, model_name, weights, precision, runtime, batch_size, max_bytes, max_pixels)
