"""The ``custom_dataset`` of the YAML tasks here: their ``data_files`` read relative to this folder.

lm-eval calls it as ``custom_dataset(**metadata, **dataset_kwargs)``; this file is loaded by path (lm-eval's
``!function dataset.jsonl_splits`` looks beside the YAML first), so it imports nothing from lmzoo.
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def jsonl_splits(data_files: dict, **_):
    """{split: Dataset} of the JSONL files ``data_files`` names (paths relative to this folder)."""
    import datasets

    splits = {}
    for split, name in data_files.items():
        path = Path(name) if Path(name).is_absolute() else HERE / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; regenerate the task data with "
                                    "python -m lmzoo.eval.harness_tasks.make_data")
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)
