"""Column reads of the fit (velofit._io): slices where columns are consecutive, padding by repetition."""

from __future__ import annotations

import numpy as np
import pytest

from velofit._io import column_index, padded_columns


def test_consecutive_columns_read_as_a_view():
    a = np.arange(40.0).reshape(4, 10)
    index = column_index(np.arange(3, 7))
    assert index == slice(3, 7)
    assert np.shares_memory(a[:, index], a)
    gaps = np.array([1, 2, 5])
    assert column_index(gaps) is gaps
    assert column_index(np.array([], dtype=np.int64)).size == 0


@pytest.mark.parametrize("cols", [[0, 1, 2], [4], [1, 3, 4], [0, 5, 6, 7, 9]])
@pytest.mark.parametrize("shape", [(10,), (6, 10), (2, 3, 10)])
def test_padded_columns_repeat_the_first_column(cols, shape):
    rng = np.random.default_rng(0)
    a = rng.standard_normal(shape)
    cols = np.asarray(cols)
    width = 6
    pad = np.concatenate([cols, np.full(width - cols.size, cols[0])])
    np.testing.assert_array_equal(padded_columns(a, cols, width), a[..., pad])


def test_padded_columns_write_into_out_in_its_dtype():
    mask = np.array([[True, False, True, True], [False, True, False, True]])
    out = np.full((2, 5), -1.0)
    got = padded_columns(mask, np.array([1, 2, 3]), 5, out=out)
    assert got is out
    np.testing.assert_array_equal(out, [[0.0, 1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 1.0, 1.0]])
