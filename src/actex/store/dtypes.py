"""The floating dtypes a hook can be stored in, by the name `--dtype` takes (int8 is not
one of them: store/quantize.py describes its codes and scales)."""

from __future__ import annotations

import ml_dtypes
import numpy as np

ACTIVATION_DTYPES: dict[str, np.dtype] = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
}


def activation_dtype(name: str) -> np.dtype:
    try:
        return ACTIVATION_DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown activation dtype {name!r}; expected one of {sorted(ACTIVATION_DTYPES)}") from None
