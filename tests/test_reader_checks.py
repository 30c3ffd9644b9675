"""The reader's checks at realistic sizes (GIL-free CRC path) and int8 dequantized in tiles.

The read-path integrity tests use tiny runs, whose checksum blocks are far below the size
at which a check releases the GIL; these use 1 MiB checksum blocks, as real runs do.
"""

from __future__ import annotations

import google_crc32c
import ml_dtypes
import numpy as np
import pytest
from reader_fixtures import write_run

from actex import open_run
from actex.reader import blocks
from actex.store import integrity, quantize
from actex.store.integrity import CorruptPartError

HOOK = "blocks.0.hook_resid_post"


@pytest.mark.parametrize("size", [0, 1, 4095, integrity.RELEASE_GIL_BYTES - 1, integrity.RELEASE_GIL_BYTES,
                                  (1 << 20) - 1, 3 << 20])
def test_crc32c_equals_google_crc32c_for_every_buffer_kind(size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    want = google_crc32c.value(data)
    for view in (data, bytearray(data), memoryview(data), np.frombuffer(data, np.uint8)):
        assert integrity.crc32c(view) == want
    assert integrity.block_crcs(data, 1, 1 << 20) == [google_crc32c.value(data[i : i + (1 << 20)])
                                                      for i in range(0, size, 1 << 20)]


def test_long_checks_release_the_gil_here():
    """google-crc32c's C library is reachable, so checks of 64 KiB or more run GIL-free."""
    assert integrity.releases_gil()


def test_a_flip_in_a_megabyte_checksum_block_is_named(tmp_path):
    """1 MiB checksum blocks (256 rows of 4 KiB): the GIL-free path finds one flipped bit."""
    expected = write_run(str(tmp_path / "run"), lengths=[[[600, 700]], [[900]]], hooks={HOOK: 1024},
                         dtype="float32")
    run = open_run(expected.url)
    part = run.parts([0])[0]
    info = run.header(part)[HOOK]
    assert info.crc_rows * info.row_bytes >= integrity.RELEASE_GIL_BYTES
    got = np.concatenate([b.activations for b in run.iter_batches(HOOK, 256, shuffle=False)])
    np.testing.assert_array_equal(got, expected.hooks[HOOK])
    path = tmp_path / "run" / part.path
    data = bytearray(path.read_bytes())
    data[info.start + 1000 * info.row_bytes + 5] ^= 0x10
    path.write_bytes(bytes(data))
    first = 1000 - 1000 % info.crc_rows  # the checksum block that holds row 1000
    with pytest.raises(CorruptPartError, match=rf"tensor {HOOK} rows \[{first}, {first + info.crc_rows}\)"):
        list(open_run(expected.url).iter_batches(HOOK, 256, shuffle=False))


@pytest.mark.parametrize("width", [24, 20])  # 20: not a whole number of blocks of 8 channels
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
def test_int8_batches_equal_numpy_dequantization_in_every_dtype(tmp_path, width, dtype):
    expected = write_run(str(tmp_path / "run"), lengths=[[[300, 5]], [[40]]], hooks={HOOK: width}, dtype="int8")
    run = open_run(expected.url)
    part = run.parts([0])[0]
    spec = run.header(part)
    raw = (tmp_path / "run" / part.path).read_bytes()
    stored = {n: spec[n].read(raw[spec[n].start : spec[n].stop], part.path, n)
              for n in (HOOK, quantize.companion(HOOK, quantize.SCALE), quantize.companion(HOOK, quantize.BLOCK_EXP))}
    want = quantize.dequantize(*stored.values()).astype(dtype)
    got = np.concatenate([b.activations for b in run.iter_batches(HOOK, 64, shuffle=False, dtype=dtype,
                                                                  chunks=[0])])
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got.view(f"u{got.itemsize}"), want.view(f"u{want.itemsize}"))


def test_dequantized_tiles_match_one_call(monkeypatch):
    """Many tiles (one row each) give exactly what one call of quantize.dequantize gives."""
    rng = np.random.default_rng(0)
    codes = rng.integers(-127, 128, (37, 20)).astype(np.int8)
    scale = rng.uniform(0.1, 2, 37).astype(np.float32)
    packed = quantize.pack_exponents(rng.integers(0, 16, (37, quantize.num_blocks(20))))
    monkeypatch.setattr(blocks, "DEQUANTIZE_TILE_BYTES", 1)
    for dtype in (np.float32, ml_dtypes.bfloat16):
        want = quantize.dequantize(codes, scale, packed).astype(dtype)
        assert blocks.dequantized(codes, scale, packed, np.dtype(dtype)).tobytes() == want.tobytes()
