"""RandomIdentitySampler: P x K structure, replacement, determinism, DDP shares."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from dcal.data.samplers import RandomIdentitySampler


def _pids(counts: list[int]) -> list[int]:
    return [pid for pid, n in enumerate(counts) for _ in range(n)]


def _check_pk(pids: np.ndarray, batches: np.ndarray, p: int, k: int) -> None:
    for batch in batches:
        ids = pids[batch].reshape(p, k)
        assert (ids == ids[:, :1]).all(), "each run of K indices is one identity"
        assert len(set(ids[:, 0].tolist())) == p, "P distinct identities per batch"


@pytest.mark.parametrize("epoch_length", ["images", "identities"])
def test_pk_structure_and_coverage(epoch_length: str) -> None:
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 20, size=60).tolist()
    pids = np.array(_pids(counts))
    s = RandomIdentitySampler(pids, batch_size=32, num_instances=4, seed=1, epoch_length=epoch_length)
    batches = s.batches()
    _check_pk(pids, batches, 8, 4)
    assert len(s) == batches.size and len(list(s)) == len(s)
    seen = Counter(pids[batches[:, ::4]].ravel().tolist())
    if epoch_length == "identities":
        assert len(batches) == 8 and set(seen) == set(range(60))  # ceil(60 / 8)
        assert max(seen.values()) <= 2
    else:
        # torchreid's epoch: one chunk per K images of each identity (at least one), until < P ids remain
        chunks = sum(max(1, n // 4) for n in counts)
        assert chunks - 8 * 7 <= batches.size // 4 <= chunks


def test_sampling_with_replacement_when_fewer_than_k() -> None:
    pids = np.array(_pids([2] * 16))  # market1501_mini: 16 ids x 2 images
    s = RandomIdentitySampler(pids, batch_size=64, num_instances=4)
    batches = s.batches()
    assert batches.shape == (1, 64)
    _check_pk(pids, batches, 16, 4)
    assert len(set(batches[0].tolist())) <= 32  # images repeat: drawn with replacement
    # identities with >= K images are drawn without replacement
    pids = np.array(_pids([9] * 8))
    for b in RandomIdentitySampler(pids, batch_size=16, num_instances=4).batches():
        assert len(set(b.tolist())) == 16


def test_determinism_and_epochs() -> None:
    pids = _pids([3, 5, 8, 4, 6, 7, 2, 9] * 3)
    a = RandomIdentitySampler(pids, batch_size=16, num_instances=4, seed=3)
    b = RandomIdentitySampler(torch.tensor(pids), batch_size=16, num_instances=4, seed=3)
    assert list(a) == list(b)
    e0 = list(a)
    a.set_epoch(1)
    assert list(a) != e0
    a.set_epoch(0)
    assert list(a) == e0
    c = RandomIdentitySampler(pids, batch_size=16, num_instances=4, seed=4)
    assert list(c) != e0


@pytest.mark.parametrize("epoch_length", ["images", "identities"])
def test_ddp_shares_are_disjoint_and_equal(epoch_length: str) -> None:
    pids = np.array(_pids(np.random.default_rng(2).integers(2, 30, size=50).tolist()))
    kw = dict(batch_size=16, num_instances=4, seed=7, epoch_length=epoch_length)
    single = RandomIdentitySampler(pids, **kw).batches()
    shares = [RandomIdentitySampler(pids, num_replicas=3, rank=r, **kw).batches() for r in range(3)]
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) == len(single) // 3
    together = np.concatenate(shares)
    assert len({tuple(b) for b in together.tolist()}) == len(together)  # no batch twice
    assert {tuple(b) for b in together.tolist()} <= {tuple(b) for b in single.tolist()}
    for s in shares:
        _check_pk(pids, s, 4, 4)


def test_dataloader_batches_are_pk() -> None:
    class Ids(Dataset):
        def __init__(self, pids: list[int]) -> None:
            self.pids = pids

        def __len__(self) -> int:
            return len(self.pids)

        def __getitem__(self, i: int) -> tuple[int, int]:
            return i, self.pids[i]

    ds = Ids(_pids([5, 1, 7, 3, 4, 6]))
    sampler = RandomIdentitySampler(ds.pids, batch_size=8, num_instances=2)
    loader = DataLoader(ds, batch_size=8, sampler=sampler, drop_last=True)
    n = 0
    for _, pid in loader:
        ids = pid.view(4, 2)
        assert (ids[:, 0] == ids[:, 1]).all() and len(set(ids[:, 0].tolist())) == 4
        n += 1
    assert n == len(sampler) // 8 > 0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="multiple"):
        RandomIdentitySampler([0, 1], batch_size=6, num_instances=4)
    with pytest.raises(ValueError, match="cannot fill"):
        RandomIdentitySampler(_pids([4, 4]), batch_size=16, num_instances=4)
    with pytest.raises(ValueError, match="rank"):
        RandomIdentitySampler(_pids([4] * 8), batch_size=8, num_instances=4, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="epoch_length"):
        RandomIdentitySampler(_pids([4] * 8), batch_size=8, num_instances=4, epoch_length="steps")


def test_fgvc_trains_on_p_x_k_class_batches_on_request() -> None:
    """``train.sampler=pk``: FGVC batches of P classes x K images (class targets as the identities); the default
    stays a plain shuffle."""
    from dcal.config import load_config
    from dcal.engine import build_datasets
    from dcal.engine.build import train_loader
    from tests.helpers import SYNTHETIC_RUN

    run = [o for o in SYNTHETIC_RUN if not o.startswith("data.synthetic_num_classes")]
    cfg = load_config(None, [*run, "data.synthetic_num_classes=4", "train.sampler=pk", "train.num_instances=2"])
    train = build_datasets(cfg)["train"]
    batches = [b.data[1] for b in train_loader(cfg, train, epoch=0)]
    # 48 images in 24 chunks of K = 2, two classes (P = 4 / 2) per batch, until fewer than P classes have chunks
    assert 10 <= len(batches) <= 12
    for targets in batches:
        pairs = targets.reshape(2, 2)
        assert (pairs == pairs[:, :1]).all() and pairs[0, 0] != pairs[1, 0]
    shuffled = load_config(None, [*run, "data.synthetic_num_classes=4"])
    assert not all(len(set(b.data[1].tolist())) == 2 for b in train_loader(shuffled, train, epoch=0))
