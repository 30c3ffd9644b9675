"""Exit codes and the two error boundaries every `actex` command shares.

    0    done (for `extract`: this worker's share of the run is committed)
    2    bad input or config, found before anything is written: ONE line on stderr
    1    infrastructure failure after retries (dataset read, store, disk full): restartable
    75   stopped by a signal or pre-emption before finishing (Ctrl-C included): rerun resumes
    130  a second Ctrl-C (128 + the signal's number for a second SIGTERM)

Errors are classified where input enters: while a command opens its inputs (flags, config,
checkpoint, dataset plan, run.json) a ValueError or a missing file is the user's
(`user_errors`); once the work runs, only I/O errors are expected (`infrastructure_errors`,
exit 1) and anything else is a bug that keeps its traceback.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import typer

from actex.config import ConfigError
from actex.store.errors import StoreError, exception_chain
from actex.store.manifest import ManifestMismatchError, mismatch_message, spelt_value

log = logging.getLogger("actex")

EXIT_DONE = 0
EXIT_INFRASTRUCTURE = 1
EXIT_USER_ERROR = 2
EXIT_STOPPED = 75  # EX_TEMPFAIL: not finished, start it again
EXIT_SECOND_INTERRUPT = 130  # 128 + SIGINT

EXIT_CODES_HELP = (
    "Exit codes: 0 done; 2 bad input or config (nothing written); 1 infrastructure failure after "
    "retries (restartable); 75 stopped by a signal or pre-emption before finishing; 130 second Ctrl-C; "
    "134 a peer process of a pod slice was lost (restart the whole slice)."
)


class UserError(Exception):
    """Raised with a one-line message meant for the user."""


# Errors that come from what the user asked for, while a command opens its inputs.
# FileExistsError: an output the user named holds something already (an export's folder).
_USER_ERRORS = (ConfigError, ValueError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                NotADirectoryError, UserError)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def infrastructure_message(error: OSError) -> str:
    """One line naming the path (when the error has one) and the cause."""
    where = f"{error.filename}: " if getattr(error, "filename", None) else ""
    return f"{where}{error.strerror or _first_line(error)}"


_USER_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def _caused_by_user(error: BaseException) -> bool:
    # `raise ... from` links only: what the store raised while handling something else
    # (its context) is not what the user pointed it at.
    return any(isinstance(cause, _USER_OS_ERRORS) for cause in exception_chain(error, explicit_only=True)[1:])


def error_line(message: str, exit_code: int, log_json: bool = False) -> None:
    """The one line of a failed command: `actex: error: ...`, or a JSON record with --log-json."""
    if log_json:
        log.error(message, extra={"data": {"event": "error", "exit_code": exit_code}})
    else:
        typer.echo(f"actex: error: {message}", err=True)


def mismatch_by_flag(error: ManifestMismatchError) -> str:
    """A run mismatch's lines with each config field spelt as its flag (--temperature, not
    config.generation.temperature) and a value left out of run.json (at its default) as
    that default, not none."""
    if not error.diffs:
        return str(error).strip()
    # generate's options are extract's and GenerationConfig's; cli.generate imports this
    # module, so it is imported when a mismatch is shown, not at the top.
    from actex.cli.generate import GENERATE_OPTIONS

    by_path = {".".join(("config", *o.path)): o for o in GENERATE_OPTIONS if o.target == "config"}

    def name(path: str) -> str:
        return by_path[path].flag if path in by_path else path.removeprefix("config.")

    def shown(path: str, value: object) -> str:
        option = by_path.get(path)
        if value is None and option is not None and not option.required:
            value = option.default
        return spelt_value(value)

    return mismatch_message(error.url, error.diffs, name=name, shown=shown)


@contextlib.contextmanager
def user_errors(log_json: bool = False) -> Iterator[None]:
    """The input boundary of a command: user-caused exceptions become one line (a JSON
    record with `log_json`) and exit 2; other I/O errors (a reset connection, a full disk,
    a store failing after retries) one line and exit 1; Ctrl-C exit 75. Anything else is a
    bug and keeps its traceback."""
    try:
        yield
    except StoreError as error:
        # The store failed after retries (1), unless what failed is where the user pointed
        # it: a file where a folder should be, no permission (2).
        code = EXIT_USER_ERROR if _caused_by_user(error) else EXIT_INFRASTRUCTURE
        error_line(_first_line(error), code, log_json)
        raise typer.Exit(code) from None
    except _USER_ERRORS as error:
        # A run mismatch lists each differing field on its own line (issue 25 item 7).
        message = mismatch_by_flag(error) if isinstance(error, ManifestMismatchError) else _first_line(error)
        if isinstance(error, PermissionError) and error.filename:
            message = f"{error.filename}: permission denied (is the output writable?)"
        error_line(message, EXIT_USER_ERROR, log_json)
        raise typer.Exit(EXIT_USER_ERROR) from None
    except OSError as error:
        error_line(infrastructure_message(error), EXIT_INFRASTRUCTURE, log_json)
        raise typer.Exit(EXIT_INFRASTRUCTURE) from None
    except KeyboardInterrupt:
        error_line("interrupted before finishing", EXIT_STOPPED, log_json)
        raise typer.Exit(EXIT_STOPPED) from None


@contextlib.contextmanager
def infrastructure_errors(log_json: bool = False) -> Iterator[None]:
    """While the work runs: the store failing after retries, any other I/O error that
    outlived its retries, or a slice's barrier timing out (a straggler, a stuck host) is not
    the user's input, so exit 1 (restartable), not 2, which `actex fleet` takes for a bad
    config and never restarts. One line naming what failed. Everything else, ValueError
    included, is a bug and keeps its traceback."""
    from actex.engine.distributed import BarrierTimeout

    try:
        yield
    except (StoreError, BarrierTimeout) as error:
        error_line(str(error), EXIT_INFRASTRUCTURE, log_json)
        raise typer.Exit(EXIT_INFRASTRUCTURE) from None
    except OSError as error:
        error_line(infrastructure_message(error), EXIT_INFRASTRUCTURE, log_json)
        raise typer.Exit(EXIT_INFRASTRUCTURE) from None


def run_store(url: str):
    """The store of the run at `url`; a UserError if no run.json is there (not a run)."""
    from actex.store.folder import open_store

    store = open_store(url)
    if not store.exists("run.json"):
        runs = _runs_inside(store)
        inside = f"; the runs in it: {', '.join(runs[:RUNS_NAMED])}" if runs else ""
        if len(runs) > RUNS_NAMED:
            inside += f" ... and {len(runs) - RUNS_NAMED} more (actex inspect {store.url.rstrip('/')}/<run>)"
        raise UserError(f"{store.url}: no run.json here (not an actex run){inside}")
    return store


# Runs a "not a run" refusal names by URL; the rest are counted.
RUNS_NAMED = 5


def _runs_inside(store) -> list[str]:
    """URLs of the run folders right under `store` (an --output folder holds its runs): one
    listing of its children, not of everything below them."""
    try:
        children = sorted(child.rstrip("/").rpartition("/")[2] for child in store.fs.ls(store.path(""), detail=False))
    except OSError:
        return []
    return [store.url_of(name) for name in children if store.exists(f"{name}/run.json")]

