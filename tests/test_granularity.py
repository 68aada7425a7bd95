"""Granularity: grouped views, ragged last groups, PEG permutation, size checks."""
from __future__ import annotations

import pytest
import torch

from lowbit.granularity import (PEG, GGUFBlock, PerChannel, PerGroup, PerTensor, PerToken, check_fits,
                                group_size_of, num_groups, reduce_dims, to_groups, ungroup)

GRANS = [PerTensor(), PerChannel(), PerGroup(32), PerGroup(64), PerGroup(172), PerGroup(1), GGUFBlock(),
         GGUFBlock(64, 16, 4), PerToken(), PEG(6), PEG(6, True), PEG(172)]


@pytest.mark.parametrize("gran", GRANS, ids=repr)
@pytest.mark.parametrize("shape", [(5, 172), (2, 3, 172)])
def test_to_groups_ungroup_roundtrip(gran, shape):
    x = torch.randn(*shape)
    xg, lay = to_groups(x, gran)
    assert xg.dim() == 3
    assert torch.equal(ungroup(xg, lay), x)
    assert lay.n == 172
    assert xg.shape[1] * xg.shape[2] == 172 + lay.pad and 0 <= lay.pad < xg.shape[2]


@pytest.mark.parametrize("g", [32, 64, 100])
def test_ragged_groups_match_python_oracle(g):
    """Group statistics of the grouped view equal those of plain Python slices of each row."""
    x = torch.randn(4, 172)
    xg, lay = to_groups(x, PerGroup(g))
    n_groups = -(-172 // g)
    assert xg.shape == (4, n_groups, g)
    for r in range(4):
        for j in range(n_groups):
            chunk = x[r, j * g:(j + 1) * g]
            assert xg[r, j].max() == chunk.max() and xg[r, j].min() == chunk.min()
            assert xg[r, j].abs().max() == chunk.abs().max()
            assert torch.equal(xg[r, j, :chunk.numel()], chunk)
    # the short last group is padded with a copy of the row's last value (keeps min, max and absmax)
    pad = xg.reshape(4, -1)[:, 172:]
    assert pad.shape[1] == lay.pad and torch.equal(pad, x[:, -1:].expand_as(pad))
    m = lay.mask()
    assert m.shape == (1, n_groups, g) and m.sum().item() == 172
    assert m.reshape(-1)[:172].all() and not m.reshape(-1)[172:].any()


def test_shared_rows_and_reduce_dims():
    x = torch.randn(6, 64)
    for gran, shared in [(PerTensor(), True), (PEG(4), True), (PerChannel(), False), (PerToken(), False),
                         (PerGroup(16), False), (GGUFBlock(64, 16, 6), False)]:
        _, lay = to_groups(x, gran)
        assert lay.shared_rows is shared
        assert reduce_dims(lay) == ((0, 2) if shared else (2,))


def test_group_sizes():
    assert group_size_of(PerTensor(), 576) == 576
    assert group_size_of(PerChannel(), 576) == 576
    assert group_size_of(PerGroup(128), 576) == 128
    assert group_size_of(GGUFBlock(), 576) == 32
    assert group_size_of(PEG(6), 576) == 96
    assert group_size_of(PEG(6), 64) == 11  # ceil(64 / 6)


def test_num_groups_oracle():
    assert num_groups(PerTensor(), (576, 576)) == 1
    assert num_groups(PerChannel(), (576, 1536)) == 576
    assert num_groups(PerGroup(128), (576, 576)) == 576 * 5
    assert num_groups(PerGroup(32), (3, 4, 172)) == 12 * 6
    assert num_groups(GGUFBlock(), (8, 512)) == 8 * 16
    assert num_groups(PerToken(), (2, 7, 64)) == 14


def test_peg_permute_puts_outlier_dims_together():
    torch.manual_seed(0)
    x = torch.randn(32, 60)
    x[:, 5] *= 100
    x[:, 33] *= 80
    xg, lay = to_groups(x, PEG(6, permute=True))
    assert lay.perm is not None
    rng = x.amax(0) - x.amin(0)
    assert torch.equal(lay.perm, torch.argsort(rng))  # ascending range
    assert set(lay.perm[-2:].tolist()) == {5, 33}
    # both outlier dims are in the last group
    last = xg[:, -1, :]
    assert last.abs().max() >= 100 and xg[:, :-1, :].abs().max() < 10
    assert torch.equal(ungroup(xg, lay), x)
    # a given permutation is used as is
    p = torch.randperm(60)
    xg2, lay2 = to_groups(x, PEG(6, permute=True), perm=p)
    assert torch.equal(lay2.perm, p) and torch.equal(xg2.reshape(32, -1)[:, :60], x[:, p])
    # without permute no permutation is kept
    _, lay3 = to_groups(x, PEG(6), perm=p)
    assert lay3.perm is None


def test_check_fits_messages():
    with pytest.raises(ValueError) as e:
        check_fits(PerGroup(256), (4, 172))
    msg = str(e.value)
    assert "256" in msg and "172" in msg and "\n" not in msg
    with pytest.raises(ValueError, match="64.*48|48.*64"):
        check_fits(GGUFBlock(256, 64, 6), (4, 48))
    with pytest.raises(ValueError, match="8"):
        check_fits(PEG(8), (4, 5))
    check_fits(PerGroup(172), (4, 172))  # equal is fine


@pytest.mark.parametrize("make", [lambda: PerGroup(0), lambda: PerGroup(-3), lambda: GGUFBlock(256, 48, 6),
                                  lambda: GGUFBlock(256, 32, 1), lambda: GGUFBlock(256, 32, 9), lambda: PEG(0)])
def test_invalid_granularities(make):
    with pytest.raises(ValueError):
        make()
