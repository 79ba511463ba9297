"""Reading a split's columns, and which config key an error about its rows names."""
from __future__ import annotations


def column_values(ds, name: str) -> list:
    """One column as a Python list (one batch read; iterating a column row by row is slow)."""
    return ds.select_columns([name])[:][name]


def source_key(cfg, split: str, column: str = "label_column") -> tuple[str, object]:
    """The key and value an error about the rows of ``split`` names: the file they came from, or the
    column that holds them."""
    if cfg.source == "files":
        split = split if cfg.files.get(split) else "train"  # carved splits come from the train file
        return f"data.files.{split}", str(cfg.files.get(split))
    return f"data.{column}", cfg.get(column)
