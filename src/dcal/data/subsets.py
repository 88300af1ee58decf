"""Parts of a data set: a subset of its classes (FGVC) or identities (Re-ID), and several splits as one.

This is what splits real data into a pretraining part and a disjoint fine-tuning part (``data.classes``,
``data.identities``, ``data.train_splits``): e.g. pretrain on CUB species 51-100 with all their images, then
fine-tune on species 1-50 with the official train/test split.

A selection is a list of class ids or names, or a string of inclusive id ranges (``"1-50"``,
``"1-10,20,31-40"``). FGVC class ids are the data set's own 1-based ids: CUB's ``classes.txt`` ids, otherwise
the 1-based position in the class list (Cars: the devkit's ids; Aircraft: the line of the variants file;
``folder``: the sorted class folders; ``synthetic``: the pattern order); names are the class names as the data
set spells them; every selected class must exist. Re-ID identities are the pids written in the file names, and
the selection filters each split (an id that a split does not hold is ignored there). A selected data set keeps the
selected classes in their original order, re-indexed 0..K-1, so the train and test sets of one selection
agree.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

_RANGE = re.compile(r"^\s*(-?\d+)\s*(?:-\s*(-?\d+)\s*)?$")
# at most this many ids in one selection: far above any data set's classes or identities (MSMT17: 4,101), and a
# range string in a stored config must not make dcal allocate a list of billions
MAX_SELECTED = 1_000_000


def parse_selection(spec: Any, key: str) -> list[int | str]:
    """``"1-50"`` / ``"1-10,20"`` / ``[1, 2, "Name"]`` -> ids (int) and names (str), in the order given.

    Raises ``ValueError`` naming ``key`` for anything else (an empty selection, a reversed range, a bool)."""
    items: list[int | str] = []
    if isinstance(spec, str):
        for part in spec.split(","):
            m = _RANGE.match(part)
            if m is None:
                raise ValueError(f"{key}: {part.strip()!r} in {spec!r} is not an id or an inclusive id range "
                                 f"'A-B'; give a list for class names")
            lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
            if hi < lo:
                raise ValueError(f"{key}: range {part.strip()!r} is empty (its end is below its start)")
            if len(items) + hi - lo + 1 > MAX_SELECTED:
                raise ValueError(f"{key}: {spec!r} selects more than {MAX_SELECTED:,} ids")
            items += range(lo, hi + 1)
    elif isinstance(spec, Sequence):
        if len(spec) > MAX_SELECTED:
            raise ValueError(f"{key}: the list selects more than {MAX_SELECTED:,} ids")
        for item in spec:
            if isinstance(item, bool) or not isinstance(item, (int, str)):
                raise ValueError(f"{key}: expects class ids (int) or names (str), got {item!r}")
            items.append(item)
    else:
        raise ValueError(f"{key}: expects a list of ids or names, or a range string like '1-50'; got {spec!r}")
    if not items:
        raise ValueError(f"{key}: the selection is empty")
    return list(dict.fromkeys(items))


def _pick(spec: Any, key: str, ids: list[int], names: list[str], what: str, strict: bool = True) -> list[int]:
    """Positions (into ``ids``/``names``) of the selected entries, in the data set's own order; ``strict``:
    every selected entry must exist."""
    by_id = {cid: i for i, cid in enumerate(ids)}
    by_name = {n: i for i, n in enumerate(names)}
    chosen, unknown = set(), []
    for item in parse_selection(spec, key):
        where = by_id.get(item) if isinstance(item, int) else by_name.get(item)
        if where is None:
            unknown.append(item)
        else:
            chosen.add(where)
    if unknown and strict:
        span = f"ids {min(ids)}-{max(ids)}" if ids else "no ids"
        raise ValueError(f"{key}: {len(unknown)} selected {what} not in this data set: {unknown[:8]} "
                         f"(it has {len(ids)} {what}, {span})")
    return sorted(chosen)


def select_classes(dataset: Any, spec: Any, key: str = "data.classes") -> Any:
    """An FGVC data set restricted to the selected classes (targets re-indexed, names kept); ``dataset`` is
    not changed."""
    import copy

    ids = list(dataset.class_ids)
    keep = _pick(spec, key, ids, list(dataset.classes), "classes")
    new_index = {old: new for new, old in enumerate(keep)}
    rows = [i for i, t in enumerate(dataset.targets) if t in new_index]
    out = copy.copy(dataset)
    out.paths = [dataset.paths[i] for i in rows]
    out.targets = [new_index[dataset.targets[i]] for i in rows]
    out.classes = [dataset.classes[i] for i in keep]
    out.class_ids = [ids[i] for i in keep]
    if not rows:
        raise ValueError(f"{key}: no {dataset.split} image of {dataset.name} belongs to the selected classes")
    return out


def select_identities(dataset: Any, spec: Any, key: str = "data.identities") -> Any:
    """A Re-ID split restricted to the selected identities (by their pids on disk); the training split is
    relabelled 0..P-1 again."""
    from dcal.data.reid import ReIDDataset

    ids = sorted(set(dataset.original_pids))
    # a filter: each split holds its own identities (query/gallery ids differ from train ids in every benchmark)
    wanted = {ids[i] for i in _pick(spec, key, ids, [str(p) for p in ids], "identities", strict=False)}
    samples = [(p, pid, cam) for p, pid, cam in zip(dataset.paths, dataset.original_pids, dataset.camids,
                                                       strict=True) if pid in wanted]
    if not samples:
        raise ValueError(f"{key}: no {dataset.split} image of {dataset.name} belongs to the selected identities")
    return ReIDDataset(samples, name=dataset.name, split=dataset.split, root=dataset.root,
                       transform=dataset.transform, relabel=dataset.split == "train")


def merge_splits(datasets: Sequence[Any]) -> Any:
    """Several splits of one FGVC data set as one (e.g. train + test of the pretraining classes); they must
    share the class list."""
    import copy

    first = datasets[0]
    if first.name == "synthetic" and len(datasets) > 1:
        raise ValueError("data.train_splits: the generated set has no other split to train on; raise "
                         "data.synthetic_train_per_class instead")
    for other in datasets[1:]:
        if list(other.classes) != list(first.classes):
            raise ValueError(f"{first.name}: splits {first.split!r} and {other.split!r} have different classes")
    if len(datasets) == 1:
        return first
    out = copy.copy(first)
    out.paths = [p for d in datasets for p in d.paths]
    out.targets = [t for d in datasets for t in d.targets]
    out.split = "+".join(d.split for d in datasets)
    return out
