"""Every read path checks every byte it returns (issue 26).

One tiny run is damaged in one way per module-scoped fixture, and each way of reading a
run back must refuse it with one line that names the part, the tensor and its rows:
shuffled and unshuffled `iter_batches`, the torch and JAX adapters, both exports, and
verify (with and without a model). The damages: a flipped byte in a hook and in each
index tensor, a truncation inside a tensor, and a header rewritten consistently (two
tensors' names swapped: offsets and checksums stay plausible, so only the commit record's
header CRC can tell). Also: a corrupt stats object, and a v1 part (no CRCs) whose flipped
byte only its sha256 can catch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from reader_fixtures import HOOKS, stored_reference, write_run
from typer.testing import CliRunner

import actex.reader.verify as verify_module
from actex import open_run
from actex.cli import app
from actex.reader.exports.legacy import export_legacy
from actex.reader.exports.saelens import export_saelens
from actex.reader.jax_data import device_batches
from actex.reader.torch_data import ActivationDataset
from actex.store import integrity, shards
from actex.store.integrity import CorruptPartError

HOOK = "blocks.1.mlp.hook_post"  # the last tensor of a part: a truncation cuts only it
LENGTHS = [[[5, 9], [7]], [[12, 3]], [[4, 4]]]  # the damaged part is chunk 0's first: 14 tokens
BAD_ROW = 9  # the row a flip lands in, or the first row a truncation cuts
# A checksum block every 2 rows of HOOK (96 bytes), so an error can name a few rows, as at
# scale it names one 1 MiB block of a tensor of many.
CRC_BLOCK_BYTES = 2 * HOOKS[HOOK] * 2
SMALL = {"block_bytes": 4 * HOOKS[HOOK] * 2, "shuffle_bytes": 12 * HOOKS[HOOK] * 2, "prefetch": 2, "threads": 2}


@dataclass(frozen=True)
class Damaged:
    url: str
    expected: object  # reader_fixtures.Expected
    part: str  # the damaged part's path in the run
    check: Callable[[str], None]  # asserts an error line names what was damaged


def rows_named(message: str, tensor: str) -> tuple[int, int]:
    match = re.search(rf"tensor {re.escape(tensor)} rows \[(\d+), (\d+)\)", message)
    assert match, f"no rows of tensor {tensor} named in: {message}"
    return int(match[1]), int(match[2])


def flip(data: bytearray, spec: dict[str, shards.TensorInfo], tensor: str) -> Callable[[str], None]:
    """One bit of one value of `tensor` (row BAD_ROW, or its last row) flipped, same size."""
    row = min(BAD_ROW, spec[tensor].rows - 1)
    data[spec[tensor].start + row * spec[tensor].row_bytes + 1] ^= 0x10

    def check(message: str) -> None:
        lo, hi = rows_named(message, tensor)
        assert lo <= row < hi and "crc32c expected" in message, message

    return check


def truncate(data: bytearray, spec: dict[str, shards.TensorInfo]) -> Callable[[str], None]:
    """The part ends inside row BAD_ROW of HOOK (the last tensor), as an interrupted copy does."""
    del data[spec[HOOK].start + BAD_ROW * spec[HOOK].row_bytes + 5 :]

    def check(message: str) -> None:
        lo, hi = rows_named(message, HOOK)
        assert "truncated" in message and hi > BAD_ROW, message

    return check


def swap_header_names(data: bytearray, header_bytes: int) -> Callable[[str], None]:
    """token_ids and positions (same dtype and shape) trade names in the header, checksums
    included: a self-consistent header that silently swaps two index tensors."""
    head = bytes(data[8:header_bytes])  # the JSON after the length field
    names = re.sub(rb"token_ids|positions", lambda m: b"positions" if m[0] == b"token_ids" else b"token_ids", head)
    assert names != head and len(names) == len(head)
    data[8:header_bytes] = names
    shards.decode_part(bytes(data))  # plausible on its own: only the commit record's CRC tells

    def check(message: str) -> None:
        assert "header crc32c expected" in message, message

    return check


DAMAGES = [f"flip {t}" for t in (HOOK, *shards.INDEX_TENSORS)] + ["truncate", "swap header names"]


@pytest.fixture(scope="module", params=DAMAGES)
def damaged(request, tmp_path_factory) -> Damaged:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(integrity, "CRC_BLOCK_BYTES", CRC_BLOCK_BYTES)
        expected = write_run(str(tmp_path_factory.mktemp("run") / "run"), lengths=LENGTHS)
    run = open_run(expected.url)
    part = run.parts([0])[0]
    spec = run.header(part)
    path = os.path.join(expected.url, part.path)
    with open(path, "rb") as f:
        data = bytearray(f.read())
    kind = request.param
    if kind.startswith("flip "):
        check = flip(data, spec, kind.removeprefix("flip "))
    elif kind == "truncate":
        check = truncate(data, spec)
    else:
        check = swap_header_names(data, part.header_bytes)
    with open(path, "wb") as f:
        f.write(data)

    def names_all(message: str) -> None:
        assert "\n" not in message and part.path in message, message
        check(message)

    return Damaged(expected.url, expected, part.path, names_all)


def raised(read: Callable[[], object]) -> str:
    with pytest.raises(CorruptPartError) as error:
        read()
    return str(error.value)


def read_unshuffled(d: Damaged, tmp_path) -> str:
    return raised(lambda: list(open_run(d.url).iter_batches(HOOK, 4, shuffle=False, **SMALL)))


def read_shuffled(d: Damaged, tmp_path) -> str:
    return raised(lambda: list(open_run(d.url).iter_batches(HOOK, 4, seed=1, **SMALL)))


def read_torch(d: Damaged, tmp_path) -> str:
    loader = torch.utils.data.DataLoader(ActivationDataset(d.url, HOOK, 4, **SMALL), batch_size=None)
    return raised(lambda: list(loader))


def read_jax(d: Damaged, tmp_path) -> str:
    return raised(lambda: list(device_batches(open_run(d.url).iter_batches(HOOK, 4, **SMALL))))


def export_sae(d: Damaged, tmp_path) -> str:
    return raised(lambda: export_saelens(open_run(d.url), tmp_path / "sae", HOOK, context_size=2))


def export_pickles(d: Damaged, tmp_path) -> str:
    return raised(lambda: export_legacy(open_run(d.url), tmp_path / "legacy"))


def failed_line(args: list[str]) -> str:
    """The one FAIL line of `actex verify ...` (exit 1)."""
    result = CliRunner().invoke(app, ["verify", *args])
    failed = [line.strip().removeprefix("FAIL").strip() for line in result.output.splitlines()
              if line.strip().startswith("FAIL")]
    assert result.exit_code == 1 and len(failed) == 1, result.output
    return failed[0]


def verify_integrity_only(d: Damaged, tmp_path) -> str:
    return failed_line([d.url, "--integrity-only"])


def verify_with_model(d: Damaged, tmp_path) -> str:
    """Recompute every sample (the "model" returns the clean stored values): only the damaged
    part fails, reported while choosing samples (its index) or by the integrity pass."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(verify_module, "load_reference", lambda *args, **kwargs: object())
        patch.setattr(verify_module, "reference_activations", stored_reference(d.expected))
        return failed_line([d.url, "--samples", "100"])


READ_PATHS = [read_unshuffled, read_shuffled, read_torch, read_jax, export_sae, export_pickles,
              verify_integrity_only, verify_with_model]


@pytest.mark.parametrize("read", READ_PATHS, ids=lambda f: f.__name__)
def test_every_read_path_names_the_damage(damaged, read, tmp_path):
    damaged.check(read(damaged, tmp_path))


def test_a_corrupt_stats_object_is_named(tmp_path):
    expected = write_run(str(tmp_path / "run"), lengths=LENGTHS)
    run = open_run(expected.url)
    path = run.record(1).stats_path
    data = bytearray(run.store.read_bytes(path))
    data[-3] ^= 0x10  # a value of the last statistic: still a well-formed stats object
    run.store.write_bytes(path, bytes(data))
    for read in (lambda r: r.stats(HOOK), lambda r: r.summary()):
        message = raised(lambda: read(open_run(expected.url)))
        assert path in message and "crc32c expected" in message and "\n" not in message, message
    inspect = CliRunner().invoke(app, ["inspect", expected.url])
    assert inspect.exit_code != 0 and path in inspect.output


def test_a_flipped_byte_in_a_v1_part_is_caught_by_its_sha256(tmp_path):
    """Format v1 parts carry no CRCs: ranged reads cannot check them, verify's whole-part
    sha256 must (docs/store.md)."""
    expected = write_run(str(tmp_path / "run"), lengths=LENGTHS, format_version=1)
    run = open_run(expected.url)
    part = run.parts([0])[0]
    spec = run.header(part)
    path = os.path.join(expected.url, part.path)
    with open(path, "r+b") as f:
        f.seek(spec[HOOK].start + 3)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    message = failed_line([expected.url, "--integrity-only"])
    assert part.path in message and "sha256 expected" in message, message
    unchecked = np.concatenate([b.activations for b in open_run(expected.url).iter_batches(HOOK, 8, shuffle=False)])
    assert not np.array_equal(unchecked, expected.hooks[HOOK])  # what v1's ranged reads cannot see
