"""Named configurations: the client's default, the synthetic data of ``make run``, public datasets.

A preset fixes the shape of the network and the training knobs; the vocabulary and context
sizes always come from the data. Overrides are applied on top (dotted keys for nested fields).
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel, ConfigDict

from recsys_assets.bert4rec.model import BERT4RecConfig
from recsys_assets.bert4rec.train import TrainConfig


class Preset(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str
    model: dict[str, Any]
    train: dict[str, Any]


# The client's default network, and training on every next-item window (each prefix with its last
# position masked, no other masking): what the tuning protocol chose on Beauty (README).
CLIENT_NETWORK: dict[str, Any] = {"hidden": 256, "layers": 4, "heads": 8, "max_len": 50, "dropout": 0.2,
                                  "previous_item_init": "item"}
SMALL_NETWORK: dict[str, Any] = {"hidden": 64, "layers": 1, "heads": 2, "max_len": 50, "dropout": 0.1,
                                 "previous_item_init": "item"}
NEXT_ITEM_WINDOWS: dict[str, Any] = {"windows": "prefixes", "mask_prob": 0.0}
# The recipes the tuning protocol chose on Beauty (README), without the number of epochs: AdamW
# without weight decay over next-item windows; the small network's larger batch and rate reach the
# same tuning NDCG@10 in half the time per epoch.
NEXT_ITEM_RECIPE: dict[str, Any] = {"lr": 1e-3, "weight_decay": 0.0, "batching": {"batch_size": 256, **NEXT_ITEM_WINDOWS}}
SMALL_NEXT_ITEM_RECIPE: dict[str, Any] = {
    "lr": 4e-3, "weight_decay": 0.0, "batching": {"batch_size": 512, **NEXT_ITEM_WINDOWS}}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            name="default",
            description="The client's default network (hidden 256, 4 layers, 8 heads, length 50).",
            model=CLIENT_NETWORK,
            train={
                "epochs": 30,
                "lr": 1e-3,
                "weight_decay": 0.01,
                "patience": 5,
                "batching": {"batch_size": 256, **NEXT_ITEM_WINDOWS},
            },
        ),
        Preset(
            name="synthetic",
            description="Small and fast, for the generated data of `make run`; "
            "it beats the last-item baseline there (README: `make run` figures).",
            model={**SMALL_NETWORK, "max_len": 20},
            train={
                "epochs": 4,
                "lr": 3e-3,
                "weight_decay": 0.0,
                "patience": 2,
                "batching": {"batch_size": 256, **NEXT_ITEM_WINDOWS},
            },
        ),
        Preset(
            name="beauty",
            description="Amazon Beauty (22k users, 12k items, median length 6) with the client's default network, "
            "chosen on the tuning protocol of benchmarks/quality_beauty.py (validation = second-to-last item, "
            "test items never seen): next-item windows at every position, full softmax, 4 epochs.",
            model=CLIENT_NETWORK,
            train={**NEXT_ITEM_RECIPE, "epochs": 4, "patience": None},
        ),
        Preset(
            name="beauty-small",
            description="Amazon Beauty on a small network (hidden 64, one block): far cheaper per epoch than "
            "`beauty`, a little less accurate. Batch 512 at lr 4e-3: the tuning NDCG@10 of 256 at 3e-3 in "
            "less time per epoch (README: training time on 2 cores).",
            model=SMALL_NETWORK,
            train={**SMALL_NEXT_ITEM_RECIPE, "epochs": 6, "patience": None},
        ),
    ]
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def build_configs(
    preset: str | Preset,
    vocab_size: int,
    context_sizes: dict[str, int] | None = None,
    model_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
) -> tuple[BERT4RecConfig, TrainConfig]:
    """Preset + data sizes + overrides -> validated configs. ``context_sizes`` uses the data's
    field names (tod, devices, segments, event_types)."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    model = copy.deepcopy(p.model)
    sizes = context_sizes or {}
    names = {"tod": "n_tod", "devices": "n_devices", "segments": "n_segments", "event_types": "n_event_types"}
    for field, size in sizes.items():
        key = names[field]
        default = BERT4RecConfig.model_fields[key].default
        model[key] = max(size, default if isinstance(default, int) else 1)
    model["vocab_size"] = vocab_size
    model = merge_overrides(model, model_overrides or {})
    train = merge_overrides(copy.deepcopy(p.train), train_overrides or {})
    return BERT4RecConfig.model_validate(model), TrainConfig.model_validate(train)


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merges nested dicts; a key ``a.b`` sets ``base['a']['b']``."""
    for key, value in overrides.items():
        if "." in key:
            head, rest = key.split(".", 1)
            base[head] = merge_overrides(dict(base.get(head) or {}), {rest: value})
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = merge_overrides(dict(base[key]), value)
        else:
            base[key] = value
    return base
