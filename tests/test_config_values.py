"""Field values users spell as text: sizes (--shard-size) and token selection (--positions)."""

from __future__ import annotations

import pytest

from actex.config import parse_size


@pytest.mark.parametrize("text, size", [
    ("1GB", 10**9), ("512MB", 512 * 10**6), ("1.5g", 15 * 10**8), ("4096", 4096), ("1GiB", 2**30),
    (" 2MB ", 2 * 10**6), ("1kib", 1024), ("3 kb", 3000),
])
def test_sizes_read_decimal_and_binary_units(text, size):
    assert parse_size(text) == size


def test_a_number_passes_and_other_text_is_a_one_line_error():
    assert parse_size(7) == 7
    for text in ("abc", "1e3", "-1", "12 parsecs"):
        with pytest.raises(ValueError) as error:
            parse_size(text)
        assert str(error.value) == f"{text!r} is not a size (e.g. 1GB, 512MB, 4096)"
