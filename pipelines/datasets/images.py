"""Image files of a split: which are absent, which do not open. Both stages and dataset generation check them."""
import os
from pathlib import Path
from typing import Iterable

from PIL import Image, UnidentifiedImageError


def missing_images(image_root: Path, keys: Iterable[str]) -> list[str]:
    """Keys whose file is absent, in the given order; one directory listing per folder, not one stat per file."""
    keys = list(keys)
    listings = {}
    for key in keys:
        parent = key.rpartition("/")[0]
        if parent not in listings:
            try:
                listings[parent] = set(os.listdir(image_root / parent))
            except (FileNotFoundError, NotADirectoryError):
                listings[parent] = set()
    return [key for key in keys if key.rpartition("/")[2] not in listings[key.rpartition("/")[0]]]


def unreadable_images(image_root: Path, keys: Iterable[str], decode: bool = True) -> dict[str, str]:
    """{path: reason} for images that do not open; `decode` decodes each in full (truncated files fail only then),
    otherwise only the header is read."""
    problems = {}
    for key in keys:
        path = Path(image_root) / key
        try:
            with Image.open(path) as image:
                if decode:
                    image.load()
        except FileNotFoundError:
            problems[str(path)] = "missing"
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
            reason = "empty file" if path.is_file() and path.stat().st_size == 0 else f"{type(error).__name__}: {error}"
            problems[str(path)] = reason
    return problems
