"""A saved pipeline folder's configs hold nothing of the machine that saved it (no torch: `python -m hf_ddpm push` and
`export` use it and start in a fraction of a second; the remote code bundles it for its own save).

diffusers records where a pipeline or component was loaded from (`_name_or_path`) and its `save_pretrained` writes
that into model_index.json and unet/config.json: after `from_pretrained(<absolute path>)`, a path holding a user
name and a directory layout, which a push would publish. Every save route of hf_ddpm ends with `drop_local_paths`.
"""

from __future__ import annotations

import json
import os

SAVED_CONFIGS = ("model_index.json", "unet/config.json", "scheduler/scheduler_config.json")
LOCAL_ONLY_KEYS = ("_name_or_path",)  # where this process loaded the object from: meaningless anywhere else


def drop_local_paths(directory, **index_keys) -> None:
    """Remove `LOCAL_ONLY_KEYS` from the configs of the saved pipeline folder `directory` (and set `index_keys` in
    its model_index.json). A saved folder is its own source: loading it records its new location again."""
    for name in SAVED_CONFIGS:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            config = json.load(f) | (index_keys if name == SAVED_CONFIGS[0] else {})
        config = {k: v for k, v in config.items() if k not in LOCAL_ONLY_KEYS}
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
