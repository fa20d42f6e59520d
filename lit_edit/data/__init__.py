"""Edit requests: the typed record, loaders for the benchmarks' schemas, benchmarks by name, and the data module."""

from lit_edit.data.datamodule import EditDataModule
from lit_edit.data.loaders import SCHEMAS, detect_schema, load_requests, save_requests
from lit_edit.data.registry import DATA_ENV, KNOWN_DATASETS, DataUnavailableError, KnownDataset
from lit_edit.data.request import EditRequest, PromptAnswer, RecordError

__all__ = [
    "DATA_ENV",
    "DataUnavailableError",
    "EditDataModule",
    "EditRequest",
    "KNOWN_DATASETS",
    "KnownDataset",
    "PromptAnswer",
    "RecordError",
    "SCHEMAS",
    "detect_schema",
    "load_requests",
    "save_requests",
]
