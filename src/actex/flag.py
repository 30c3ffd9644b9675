"""Flag: optional command-line metadata on a config field (see cli/options.py).

Its own module because both config models (actex.config and actex.data.config) use it and
the first imports the second.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Flag:
    """Optional metadata on a config field: how it shows on the command line.

    Without it a field still becomes `--field-name` / `ACTEX_FIELD_NAME` in its model's panel.
    `panel`: the --help section; `text`: the flag takes text the model's own validator parses
    (sizes such as "1GB"); `skip`: not a flag at all.
    """

    panel: str | None = None
    text: bool = False
    skip: bool = False
