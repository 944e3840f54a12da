"""Datasets in the CoOp layout: registry, split loading and verification, conversion, few-shot selections.

    ds = load_dataset("eurosat", data_root)          # .train/.val/.test [Sample(key, label, classname)]
    shots = fewshot_selection(ds, shots=16, seed=1)  # written once to <dataset dir>/fewshot/, then read back
    train = ds.select(shots.train)
    base_train, base_names = subsample_classes(train, ds.classnames, "base")
"""
from pipelines.datasets.dataset import Dataset, Sample, load_dataset
from pipelines.datasets.errors import DatasetError
from pipelines.datasets.fewshot import (FewShot, draw_fewshot, fewshot_keys, fewshot_path, fewshot_selection,
                                        subsample_classes)
from pipelines.datasets.folder import make_folder_split
from pipelines.datasets.images import missing_images, unreadable_images
from pipelines.datasets.preparation import dataset_status, prepare
from pipelines.datasets.registry import (DATASETS, DatasetInfo, Source, dataset_slug, download_sources, get_info,
                                         instructions, known_names)
from pipelines.datasets.synthetic import make_synthetic

__all__ = [
    "DATASETS", "Dataset", "DatasetError", "DatasetInfo", "FewShot", "Sample", "Source", "dataset_slug",
    "dataset_status", "download_sources", "draw_fewshot", "fewshot_keys", "fewshot_path", "fewshot_selection",
    "get_info", "instructions", "known_names", "load_dataset", "make_folder_split", "make_synthetic", "missing_images",
    "prepare", "subsample_classes", "unreadable_images",
]
