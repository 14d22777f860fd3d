"""New items for the served bundle without a full retrain: what is new, in which token space, and
how often the grown model shows new items and how well.

An item is new when the current data (``item_vocabulary``) has it and the served bundle's
vocabulary does not. Its peers are the bundle's items of its category (the category the current
data gives it); an item without a category, or of a category the bundle has no item of, is left
out and counted: it stays unknown to the served model (its events are kept and serving skips it in
a history) until the next full retrain. The grown model (``bert4rec.new_items``) appends the new
items after the bundle's tokens, so every old token keeps its number and its rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from recsys_assets.data.split import EvalSet
from recsys_assets.evaluation.metrics import per_user_metrics
from recsys_serving.bundle import Vocabulary
from recsys_serving.contract import FIRST_ITEM_TOKEN, PAD_TOKEN

UPTAKE_K = 10  # the answer length the uptake figures count (the report's headline cut-off)


@dataclass
class NewItems:
    """The items to append, in token order: ``item_ids[i]`` becomes token ``vocab_size + i``."""

    item_ids: list[str]
    categories: list[str]
    peers: list[np.ndarray]  # bundle tokens of each item's category
    left_out: dict[str, int] = field(default_factory=dict)  # reason -> items not added


def find_new_items(
    vocabulary: Vocabulary,
    item_ids: Sequence[str],
    categories: Sequence[str | None],
    counts: Sequence[int],
    max_new: int | None = None,
) -> NewItems:
    """The items of the current vocabulary (`item_ids`, `categories`, `counts` by its token order)
    that `vocabulary` (the bundle's) lacks, most interacted first, at most `max_new` of them."""
    known = vocabulary.item_to_token
    current_category = {str(i): c for i, c in zip(item_ids, categories)}
    by_category: dict[str, list[int]] = {}
    for token, (item, recorded) in enumerate(zip(vocabulary.items, vocabulary.categories), start=FIRST_ITEM_TOKEN):
        category = current_category.get(item) or recorded  # the current data's word first
        if category:
            by_category.setdefault(str(category), []).append(token)
    fresh = [(int(c), str(i), cat) for i, cat, c in zip(item_ids, categories, counts) if str(i) not in known]
    fresh.sort(key=lambda x: (-x[0], x[1]))
    out = NewItems(item_ids=[], categories=[], peers=[], left_out={})
    for _, item, category in fresh:
        reason = None
        if not category:
            reason = "no_category"
        elif str(category) not in by_category:
            reason = "category_unknown_to_bundle"
        elif max_new is not None and len(out.item_ids) >= max_new:
            reason = "over_max_new_items"
        if reason is not None:
            out.left_out[reason] = out.left_out.get(reason, 0) + 1
            continue
        out.item_ids.append(item)
        out.categories.append(str(category))
        out.peers.append(np.asarray(by_category[str(category)], dtype=np.int64))
    return out


def grown_vocabulary_document(vocabulary: Vocabulary, new: NewItems) -> dict[str, Any]:
    """vocabulary.json of the grown bundle: the bundle's tokens unchanged, the new items after them."""
    categories = [*vocabulary.categories, *new.categories]
    return {
        "items": [*vocabulary.items, *new.item_ids],
        "categories": categories if any(c is not None for c in categories) else None,
        "context": {"device": dict(vocabulary.devices), "segment": dict(vocabulary.segments)},
    }


def to_vocabulary_space(
    sequences: Sequence[np.ndarray],
    contexts: Mapping[str, Sequence[np.ndarray]],
    target_masks: Sequence[np.ndarray] | None,
    item_ids: Sequence[str],
    context_values: Mapping[str, Mapping[int, str]],
    vocabulary: Vocabulary,
) -> tuple[list[np.ndarray], dict[str, list[np.ndarray]], list[np.ndarray] | None]:
    """Sequences of the current token space (token t = ``item_ids[t - FIRST_ITEM_TOKEN]``) in the
    token space of `vocabulary`. Positions of items it does not know are dropped, with their
    context, as serving drops them from a history, and a sequence left empty is dropped; device and
    segment tokens are renumbered by value (`context_values`: current token -> value; unknown values
    become 0, the no-op token)."""
    lookup = vocabulary.item_to_token
    token_map = np.asarray([PAD_TOKEN] * FIRST_ITEM_TOKEN + [lookup.get(str(i), -1) for i in item_ids], dtype=np.int64)
    renumber = {
        "devices": (context_values.get("device", {}), vocabulary.devices),
        "segments": (context_values.get("segment", {}), vocabulary.segments),
    }
    context_maps: dict[str, np.ndarray] = {}
    for name, (values, tokens) in renumber.items():
        size = max(values, default=0) + 1
        context_maps[name] = np.asarray([tokens.get(values.get(t, ""), 0) for t in range(size)], dtype=np.int64)
    out_seq: list[np.ndarray] = []
    out_ctx: dict[str, list[np.ndarray]] = {name: [] for name in contexts}
    out_masks: list[np.ndarray] | None = None if target_masks is None else []
    for row, tokens in enumerate(sequences):
        mapped = token_map[np.asarray(tokens, dtype=np.int64)]
        keep = mapped >= FIRST_ITEM_TOKEN
        if not keep.any():
            continue  # nothing of this user's is known: nothing to learn from
        out_seq.append(mapped[keep])
        for name, values in contexts.items():
            c = np.asarray(values[row], dtype=np.int64)[keep]
            if name in context_maps:
                table = context_maps[name]
                c = np.where(c < len(table), table[np.minimum(c, len(table) - 1)], 0)
            out_ctx[name].append(c)
        if out_masks is not None and target_masks is not None:
            out_masks.append(np.asarray(target_masks[row], dtype=bool)[keep])
    return out_seq, out_ctx, out_masks


def new_item_uptake(top: np.ndarray, eval_set: EvalSet, ranks: np.ndarray, is_new: np.ndarray) -> dict[str, float]:
    """How often and how well a model shows new items, from its top-`UPTAKE_K` answers (`top`,
    tokens), its full-protocol `ranks` on `eval_set` and ``is_new[token]``:

    - new_item_slot_share: share of the answers' slots that hold a new item;
    - users_shown_new_item: share of users with at least one new item in their answer;
    - new_item_precision: share of shown new items that were the user's next item;
    - new_target_users: users whose next item is new; HR@10 / NDCG@10 over them and over the others
      (what showing new items costs the users who wanted a known one)."""
    shown = is_new[top]
    hits = top == eval_set.targets[:, None]
    new_target = is_new[eval_set.targets]
    out = {
        "new_item_slot_share": float(shown.mean()) if shown.size else 0.0,
        "users_shown_new_item": float(shown.any(axis=1).mean()) if shown.size else 0.0,
        "new_item_precision": float((hits & shown).sum() / shown.sum()) if shown.sum() else 0.0,
        "new_target_users": int(new_target.sum()),
    }
    for name, users in (("new_targets", new_target), ("old_targets", ~new_target)):
        if users.any():
            per_user = per_user_metrics(ranks[users], (UPTAKE_K,))
            out.update({f"{m}_{name}": float(per_user[m].mean()) for m in (f"HR@{UPTAKE_K}", f"NDCG@{UPTAKE_K}")})
    return out
