"""`transagent datasets ls|prepare|fewshot`: what is there, make it ready, draw few-shot selections."""
import click

from pipelines import options as opt
from pipelines.datasets import (DATASETS, DatasetError, dataset_status, fewshot_path, fewshot_selection, load_dataset,
                                prepare as prepare_dataset)
from pipelines.progress import quiet_option


def _fail(error):
    raise click.ClickException(str(error))


@click.group()
def datasets():
    """Datasets in the CoOp layout (split files, class names, templates, few-shot selections)."""


@datasets.command("ls")
@opt.data_root
def ls(data_root):
    """List known datasets with their state under the data root."""
    rows = [("name", "images", "split", "classes", "template")]
    for info in DATASETS.values():
        images, split = dataset_status(info, data_root)
        classes = str(info.num_classes) if info.num_classes else "10 (default)"
        rows.append((info.name, images, split, classes + (" test-only" if info.test_only else ""), info.template))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    click.echo(f"data root: {data_root}")
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)) + "  " + row[4])
    click.echo("folder:<dir>: your own images, <data root>/<dir>/<class name>/<image>; "
               "split.json (50/20/30 per class) is written on first use.")


@datasets.command()
@click.argument("name")
@opt.data_root
@click.option("--download/--no-download", default=True, show_default=True,
              help="Fetch what has a stable URL: EuroSAT's images, CoOp's split files (Google Drive, through "
                   "gdown), the official TransAgent description files; `$TRANSAGENT_REGISTRY` may point elsewhere.")
@quiet_option
def prepare(name, data_root, download):
    """Download, convert or generate NAME and verify it against its split file."""
    try:
        ds = prepare_dataset(name, data_root, download=download)
    except DatasetError as error:
        _fail(error)
    sizes = " / ".join(f"{split} {len(ds.split(split))}" for split in ("train", "val", "test"))
    click.echo(f"{ds.name}: ready. {ds.num_classes} classes; {sizes} images under {ds.image_root}")
    click.echo(f"split {ds.split_path.name} sha256 {ds.split_hash}")
    click.echo(f"template {ds.template!r}; classes {', '.join(ds.classnames[:5])}"
               + (", ..." if ds.num_classes > 5 else ""))
    for agent in ("gpt3", "vicuna"):
        path = ds.root / "descriptions" / f"{agent}.json"
        if path.is_file():
            click.echo(f"{agent} descriptions {path}")


@datasets.command()
@click.argument("name")
@opt.shots
@opt.seeds
@opt.data_root
def fewshot(name, shots, seeds, data_root):
    """Draw (once) or read the few-shot selections of NAME for each shot count and seed."""
    try:
        ds = load_dataset(name, data_root)
        for k, seed in ((k, seed) for k in shots for seed in seeds):
            existed = fewshot_path(ds, k, seed).exists()
            selection = fewshot_selection(ds, k, seed)
            click.echo(f"{selection.path}: {len(selection.train)} train / {len(selection.val)} val keys "
                       f"({'reused' if existed else 'written'})")
    except DatasetError as error:
        _fail(error)
