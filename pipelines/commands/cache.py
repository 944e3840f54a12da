"""`transagent cache ls|verify|pack|push|pull|merge|gc|unlock`: inspect, check and share teacher caches."""
from __future__ import annotations

import json
from pathlib import Path

import click

from pipelines import options as opt
from pipelines import progress as bars


def _fail_on_cache_errors(function):
    """Cache errors are the user's to fix: show the message, not a traceback."""
    import functools

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        from cache_schema import CacheError
        from pipelines.cache_hints import explained

        try:
            return function(*args, **kwargs)
        except CacheError as error:
            raise click.ClickException(explained(error)) from None
    return wrapper


def _size(size: float) -> str:
    from pipelines.extraction import format_bytes

    return format_bytes(size)


def _table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


@click.group()
def cache():
    """Inspect, verify and share teacher caches (`<cache-root>/<dataset>/<agent>/<fingerprint>/`)."""


@cache.command("ls")
@opt.cache_root
@click.option("--dataset", default=None, help="Only this dataset.")
@click.option("--agent", default=None, help="Only this agent.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per cache (bytes as a number, the path).")
def ls(cache_root, dataset, agent, as_json):
    """List caches: rows, views, size on disk, status and who made them."""
    import glob

    from cache_schema import list_caches
    from cache_schema.catalogue import summary
    from pipelines.datasets import dataset_slug

    dataset = glob.escape(dataset_slug(dataset)) if dataset else None  # --dataset folder:<dir> is its directory
    listed = list_caches(cache_root, dataset, agent)
    found = [summary(path, manifest) for path, manifest in listed]
    if as_json:
        for (path, _), row in zip(listed, found, strict=True):
            click.echo(json.dumps({**row, "path": str(path)}, sort_keys=True))
        return
    if not found:
        click.echo(f"no caches under {cache_root}")
        return
    for row in found:
        row["size"] = _size(row["bytes"])
    click.echo(_table(found, ["dataset", "agent", "fingerprint", "rows", "views", "size", "status", "created_by",
                              "created_at"]))
    for _, manifest in listed:
        if "problem" in manifest:
            click.echo(f"unreadable: {manifest['problem']}")


@cache.command()
@opt.cache_root
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@bars.quiet_option
def verify(cache_root, paths):
    """Hash every file of the given caches (default: all under --cache-root); exit 1 on any problem."""
    from cache_schema import list_caches, verify as verify_cache
    from cache_schema.catalogue import disk_usage

    paths = list(paths) or [path for path, _ in list_caches(cache_root)]
    if not paths:
        raise click.ClickException(f"no caches under {cache_root}")
    bad = 0
    with bars.callback("verify") as progress:
        if bars.enabled():
            sizes = [disk_usage(path) for path in paths]
            progress.set_size(sum(sizes))
        for number, path in enumerate(paths):
            problems = verify_cache(path)
            bad += bool(problems)
            click.echo(f"ok      {path}" if not problems else "\n".join(f"PROBLEM {problem}" for problem in problems))
            if bars.enabled():
                progress.relative_update(sizes[number])
    if bad:
        raise click.ClickException(f"{bad} of {len(paths)} cache(s) have problems")


@cache.command()
@click.argument("cache_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="Pack file (default: ./<dataset>-<agent>-<fingerprint>.tar).")
@bars.quiet_option
@_fail_on_cache_errors
def pack(cache_dir, out):
    """Write a complete cache as one deterministic, uncompressed tar (no pickles)."""
    from cache_schema.manifest import read_manifest
    from cache_schema.pack import PACK_EXT, pack_cache

    manifest = read_manifest(cache_dir / "manifest.json") if (cache_dir / "manifest.json").is_file() else {}
    default = f"{manifest.get('dataset', 'cache')}-{manifest.get('agent', 'agent')}-{cache_dir.name}{PACK_EXT}"
    if out is not None and out.is_dir():
        raise click.BadParameter(f"{out} is a directory; give the pack's file name, e.g. {out / default}",
                                 param_hint="-o/--out")
    out = out or Path(default)
    opt.require_writable(Path(out).absolute().parent, "-o/--out")
    with bars.callback(f"pack {cache_dir.name}") as progress:
        info = pack_cache(cache_dir, out, callback=progress)
    click.echo(f"{out}  {info.rows} rows  {_size(info.bytes)}  sha256 {info.sha256}")


@cache.command()
@click.argument("path", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("url")
@click.option("--dataset", default=None, help="With a cache root: only caches of this dataset.")
@click.option("--agent", default=None, help="With a cache root: only caches of this agent.")
@click.option("--fingerprint", default=None, help="With a cache root: only the cache with this fingerprint.")
@click.option("--replace", is_flag=True, help="Overwrite a remote pack of the same fingerprint with other content.")
@bars.quiet_option
@_fail_on_cache_errors
def push(path, url, dataset, agent, fingerprint, replace):
    """Pack and upload one cache directory, or every complete cache under a cache root PATH that matches the
    filters, to URL (file://, s3://, gs://, ssh://, hf://), updating URL/index.json."""
    import glob

    from pipelines.datasets import dataset_slug
    from pipelines.share import push_root

    dataset = glob.escape(dataset_slug(dataset)) if dataset else None  # --dataset folder:<dir> is its directory
    results = push_root(path, url, dataset, agent, fingerprint, replace=replace, keep_going=True,
                        progress=bars.callback)
    for result in results:
        if result.status == "failed":
            click.echo(f"failed    {result.name}\n  {result.error}", err=True)
        elif result.status == "skipped":
            click.echo(f"skipped   {result.name}  ({result.error})")
        else:
            entry = result.entry
            click.echo(f"{result.status:<9} {result.name}  {entry['rows']} rows  {_size(entry['bytes'])}  -> {url}")
    failed = sum(result.status == "failed" for result in results)
    if failed:
        raise click.ClickException(f"{failed} of {len(results)} push(es) failed")


@cache.command()
@click.argument("url")
@opt.cache_root
@click.option("--dataset", default=None, help="Only caches of this dataset.")
@click.option("--agent", default=None, help="Only caches of this agent.")
@click.option("--fingerprint", default=None, help="Only the cache with this fingerprint.")
@opt.wait
@bars.quiet_option
@_fail_on_cache_errors
def pull(url, cache_root, dataset, agent, fingerprint, wait):
    """Download caches listed in URL/index.json (or one URL/...tar), verify them, then make them visible."""
    from pipelines.share import pull as pull_caches

    opt.require_writable(cache_root, "--cache-root")
    results = pull_caches(url, cache_root, dataset, agent, fingerprint, keep_going=True, wait=wait,
                          progress=bars.callback)
    for result in results:
        if result.status == "failed":
            click.echo(f"failed    {result.name}\n  {result.error}", err=True)
        else:
            click.echo(f"{result.status:<9} {result.name} -> {result.path}")
    failed = sum(result.status == "failed" for result in results)
    if failed:
        raise click.ClickException(f"{failed} of {len(results)} pull(s) failed; nothing of them was installed")


@cache.command()
@click.argument("src_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("dst_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@opt.wait
@bars.quiet_option
@_fail_on_cache_errors
def merge(src_dir, dst_dir, wait):
    """Add SRC_DIR's rows to DST_DIR (same fingerprint); rows both hold must be identical."""
    from cache_schema.merge import merge as merge_caches

    opt.require_writable(dst_dir, "DST_DIR")
    with bars.callback("merge", unit="row") as progress:
        result = merge_caches(src_dir, dst_dir, wait=wait, callback=progress)
    files = f", {len(result.added_files)} file(s)" if result.added_files else ""
    click.echo(f"merged {src_dir} into {dst_dir}: {result.added_rows} new row(s){files}, "
               f"{result.skipped_rows} already present")


@cache.command()
@opt.cache_root
@opt.runs_root
@click.option("--apply", "apply_", is_flag=True, help="Delete (default: only list what would be deleted).")
@opt.wait
def gc(cache_root, runs_root, apply_, wait):
    """Partial caches and caches no run references (runs' config.json `caches`). Dry run unless --apply.
    A cache being written (its writer lock is held) is kept; removal re-checks its status under that lock."""
    from cache_schema.gc import gc_candidates, remove_cache
    from cache_schema.lock import WriterLocked
    from pipelines.cache_gc import referenced_caches

    referenced = referenced_caches(cache_root, runs_root)
    if referenced is None:
        click.echo(f"no run under {runs_root} lists its caches: only partial caches and leftovers are candidates")
    candidates = gc_candidates(cache_root, referenced)
    if not candidates:
        click.echo("nothing to collect")
        return
    freed = 0
    for candidate in candidates:
        if candidate.unreadable:
            click.echo(f"unreadable {candidate.path}  ({candidate.unreadable}; kept: gc deletes only caches it can "
                       "read; `transagent cache verify` says what is wrong, delete the directory by hand if it is not "
                       "wanted)")
        elif candidate.writer and not (apply_ and wait):
            click.echo(f"locked    {candidate.path}  ({candidate.reason}; being written by {candidate.writer}; kept)")
        elif candidate.readers:
            click.echo(f"in use    {candidate.path}  ({candidate.reason}; read by {', '.join(candidate.readers)}; "
                       "kept)")
        elif not apply_:
            click.echo(f"would delete {candidate.path}  ({candidate.reason}, {_size(candidate.bytes)})")
            freed += candidate.bytes
        else:
            try:
                removed = remove_cache(candidate.path, cache_root, candidate.status, wait)
            except WriterLocked as error:
                click.echo(f"locked    {candidate.path}  ({error.holder.describe() if error.holder else error}; kept)")
                continue
            if removed:
                click.echo(f"deleted   {candidate.path}  ({candidate.reason}, {_size(candidate.bytes)})")
                freed += candidate.bytes
            else:
                click.echo(f"kept      {candidate.path}  (a reader appeared, or it changed since it was listed)")
    click.echo(f"{'freed' if apply_ else 'would free'} {_size(freed)}" + ("" if apply_ else "; re-run with --apply"))


@cache.command()
@click.argument("cache_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--force", is_flag=True, help="Remove the writer lease although it looks alive.")
@_fail_on_cache_errors
def unlock(cache_dir, force):
    """Remove the writer lock a dead process left on CACHE_DIR.

    A lease whose holder died on this host, or whose heartbeat stopped (a dead node on a shared file system), is
    taken over by the next writer on its own; --force is for the rest, once you know its holder is dead."""
    from cache_schema.lock import LEASE, WRITER, current_holder, force_unlock, read_lease

    live = current_holder(cache_dir)
    if live is None:
        lease = read_lease(cache_dir / WRITER / LEASE)
        click.echo(f"{cache_dir} is not locked" + (f" (a stale lease of {lease.describe()} is taken over by the "
                                                   "next writer)" if lease else ""))
        return
    if not force:
        raise click.ClickException(f"{cache_dir} is locked by {live.describe()}; if that process is dead, "
                                   f"`transagent cache unlock --force {cache_dir}`")
    removed = force_unlock(cache_dir)
    click.echo(f"removed the writer lease of {removed.describe() if removed else 'nobody'} from {cache_dir}")
