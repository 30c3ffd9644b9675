"""Flags and ACTEX_* environment variables of `actex extract`, generated from the config models.

One source: every field of RunConfig, of DataConfig (its `data`), of HookSelection and of
WorkerOptions is one flag `--field-name` and one variable `ACTEX_FIELD_NAME`, with the
field's description as help, its default shown from the model and its type checked by click.
A field added to a model is a flag and a variable without touching this module (a `Flag` in
its annotation picks the --help panel; see actex.flag).

Precedence: a flag beats its variable (click resolves both into one value), both beat a
field from the `--config` file (merged below them), and the model's default applies last.
Every option defaults to None here, meaning "not given", so defaults live in the models only.
"""

from __future__ import annotations

import difflib
import enum
import inspect
import json
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import typer
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

from actex.config import ConfigError, DeviceConfig, HookSelection, RunConfig, WorkerOptions
from actex.flag import Flag
from actex.store.records import reason

ENV_PREFIX = "ACTEX_"
CONFIG_ENV = f"{ENV_PREFIX}CONFIG"
# ACTEX_* variables other parts of actex read, which a worker may inherit: not typos.
OTHER_VARIABLES = frozenset({
    "ACTEX_TPU_API_ENDPOINT",  # actex tpu / deploy / monitor
    "ACTEX_HOME", "ACTEX_VENV", "ACTEX_METADATA_URL",  # the TPU VM bootstrap (fleet/bootstrap.py)
})


@dataclass(frozen=True)
class ConfigOption:
    """One field as a command-line option.

    path: where the value goes in the fields dict, e.g. ("data", "max_seq_len");
    name: the command function's parameter (unique); flag, envvar: "--max-seq-len",
    "ACTEX_MAX_SEQ_LEN"; kind: str, int, float or bool (click's type); choices: the
    Literal's values; split: a list field given as comma-separated text; target: "config"
    (fields of the run) or "worker" (WorkerOptions).
    """

    path: tuple[str, ...]
    name: str
    flag: str
    envvar: str
    description: str
    panel: str
    kind: type
    choices: tuple[str, ...] | None
    split: bool
    default: Any
    target: str
    # The model that validates this field, and where its fields start in the fields dict:
    # a flag's value is checked by it alone, so a refusal can name the flag (see collect).
    owner: type[BaseModel] | None = None
    owner_path: tuple[str, ...] = ()

    @property
    def required(self) -> bool:
        return self.default is PydanticUndefined

    @property
    def help(self) -> str:
        """The description with the model's default appended (when it has a plain one)."""
        if self.required or self.default is None or "(default:" in self.description:
            return self.description
        return f"{self.description} (default: {show_value(self.default)})"


def show_value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def _kind(annotation: Any) -> tuple[type, tuple[str, ...] | None, bool]:
    """(click type, choices, split) for a field's annotation; Optional[X] is X."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if str in members:  # str | list[str]: the text form is enough on a command line
            return str, None, False
        if len(members) == 1:
            return _kind(members[0])
        return str, None, False
    if origin is Literal:
        return str, tuple(str(v) for v in typing.get_args(annotation)), False
    if origin in (list, tuple):
        return str, None, True
    if annotation in (bool, int, float, str):
        return annotation, None, False
    return str, None, False  # anything else: text the model's validator parses


def model_options(model: type[BaseModel], *, target: str, panel: str, path: tuple[str, ...] = (),
                  taken: set[str] | None = None,
                  owner: tuple[type[BaseModel], tuple[str, ...]] | None = None) -> list[ConfigOption]:
    """The options of `model`'s fields, nested models flattened (their fields under `path`).

    A nested field whose name is taken already (data.revision after revision) is prefixed
    with its model's field name: --data-revision. Two top-level fields of one name (across
    the models of one command) are a bug: ValueError.
    """
    taken = set() if taken is None else taken
    owner = (model, path) if owner is None else owner
    options: list[ConfigOption] = []
    nested: list[tuple[str, type[BaseModel]]] = []
    for field_name, info in model.model_fields.items():
        # pydantic keeps Annotated[...] extras, a Flag among them, in `metadata`.
        flag = next((m for m in info.metadata if isinstance(m, Flag)), Flag())
        annotation = info.annotation
        if flag.skip:
            continue
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            nested.append((field_name, annotation))
            continue
        name = field_name if field_name not in taken else "_".join((*path, field_name))
        if name in taken:
            raise ValueError(f"two options named --{name.replace('_', '-')} ({model.__name__}.{field_name})")
        taken.add(name)
        kind, choices, split = (str, None, False) if flag.text else _kind(annotation)
        default = info.default if info.default_factory is None else info.default_factory()
        options.append(ConfigOption(
            path=(*path, field_name), name=name, flag="--" + name.replace("_", "-"),
            envvar=ENV_PREFIX + name.upper(), description=info.description or field_name.replace("_", " "),
            panel=flag.panel or panel, kind=kind, choices=choices, split=split, default=default, target=target,
            owner=owner[0], owner_path=owner[1],
        ))
    for field_name, sub in nested:
        options += model_options(sub, target=target, panel=field_name.replace("_", " ").capitalize(),
                                 path=(*path, field_name), taken=taken, owner=owner)
    return options


def extract_options() -> list[ConfigOption]:
    """Every option of `actex extract`, in --help order: the run's fields, then the worker's."""
    taken: set[str] = set()
    return [
        *model_options(RunConfig, target="config", panel="Run", taken=taken),
        *model_options(HookSelection, target="config", panel="Hooks", taken=taken),
        # This worker's devices: config-file fields too, split off again by open_run.
        *model_options(DeviceConfig, target="config", panel="Performance", taken=taken),
        *model_options(WorkerOptions, target="worker", panel="Workers", taken=taken),
    ]


# Longer value lists do not fit the type column at 80 columns (rich folds them mid-word):
# they show as <choice> and are listed in the help text, which wraps between words.
CHOICES_SHOWN_AS_TYPE = 16


def typer_parameter(option: ConfigOption, hidden: bool = False) -> inspect.Parameter:
    """The command-function parameter typer turns into the click option (`hidden`: accepted,
    not shown by --help)."""
    declaration = f"{option.flag}/--no-{option.flag[2:]}" if option.kind is bool else option.flag
    help_text, metavar = option.help, None
    if option.choices and len("|".join(option.choices)) > CHOICES_SHOWN_AS_TYPE:
        listed = f"{option.description} One of: {', '.join(option.choices)}."
        help_text, metavar = help_text.replace(option.description, listed, 1), "<choice>"
    default = typer.Option(
        None, declaration, help=help_text, envvar=option.envvar, show_envvar=True, metavar=metavar,
        rich_help_panel=option.panel, show_default=False, hidden=hidden,
    )
    # typer checks choices given as an Enum (collect() takes the member's value back out).
    kind = enum.Enum(option.name, {c: c for c in option.choices}, type=str) if option.choices else option.kind
    return inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Optional[kind])


@dataclass(frozen=True)
class ExtractInputs:
    """What one `actex extract` invocation was given, split by destination."""

    fields: dict  # run fields (flags > env > --config file); the models fill defaults later
    worker: WorkerOptions
    config_file: Path | None
    show_config: bool


def with_extract_options(body: Callable[[dict], None], *, doc: str,
                         options: list[ConfigOption] | None = None) -> Callable[..., None]:
    """A typer command function taking every extract option, calling `body(values)`.

    `values` maps each parameter name to click's value (flag, else variable, else None);
    `collect(values, options)` sorts them into run fields and worker options (inside the
    command's user-error handling, as it raises ConfigError).
    """
    options = extract_options() if options is None else options
    meta = [
        inspect.Parameter("config_file", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path], default=typer.Option(
            None, "--config", envvar=CONFIG_ENV, show_envvar=True, rich_help_panel="Run",
            help="YAML/JSON file of fields (as in run.json's config); flags and ACTEX_* variables override it.")),
        inspect.Parameter("show_config", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
            False, "--show-config", rich_help_panel="Run",
            help="Print the fields and worker options this command resolved (flags > ACTEX_* > --config > defaults) as JSON, and exit.")),
    ]
    # Generation-only flags (--samples-per-prompt) are DataConfig fields, so extract takes
    # them too (and refuses them with a reason); only a generating command shows them.
    generating = any(o.path[0] == "generation" for o in options)
    params = meta + [typer_parameter(o, hidden=o.panel == "Generation" and not generating) for o in options]

    def command(**values: Any) -> None:
        body(values)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = doc
    return command


def collect(values: Mapping[str, Any], options: Iterable[ConfigOption]) -> ExtractInputs:
    """Click's values (flag or variable, None when neither) -> run fields and worker options.

    Raises ConfigError (one line, naming the flag) for a value its field refuses.
    """
    fields: dict = {}
    worker: dict = {}
    worker_flags = {}
    for option in options:
        if option.target == "worker":
            worker_flags[option.path[-1]] = option
        value = values.get(option.name)
        if value is None:
            continue
        if isinstance(value, enum.Enum):
            value = value.value
        if option.split:
            value = [v.strip() for v in value.split(",") if v.strip()] or None
            if value is None:
                continue
        if option.target == "worker":
            worker[option.path[-1]] = value
        else:
            place = fields
            for part in option.path[:-1]:
                place = place.setdefault(part, {})
            place[option.path[-1]] = value
    check_given(fields, [o for o in options if o.target == "config"])
    try:
        worker_options = WorkerOptions.model_validate(worker)
    except ValidationError as error:
        first = error.errors()[0]
        option = worker_flags.get(str(first["loc"][0])) if first["loc"] else None
        where = f"{option.flag} (or {option.envvar})" if option else "worker options"
        raise ConfigError(f"{where}: {reason(first)}") from None
    return ExtractInputs(fields, worker_options, values.get("config_file"), bool(values.get("show_config")))


def check_given(fields: dict, options: list[ConfigOption]) -> None:
    """Validate the flag and variable values in `fields` by their models, each model given
    only these: ConfigError '--flag (or ACTEX_VAR): reason' for the first value refused.

    A field's own checks (limits, parsers, field validators) need no other field, so a
    refusal here is the flag's; what is missing, or wrong only in combination, is judged
    later with the --config file's fields (and named by field).
    """
    by_path = {option.path: option for option in options}
    for owner, path in dict.fromkeys((o.owner, o.owner_path) for o in options if o.owner is not None):
        given = fields
        for part in path:
            given = given.get(part) if isinstance(given, dict) else None
        if not given:
            continue
        try:
            owner.model_validate(given)
        except ValidationError as error:
            for problem in error.errors():
                option = _option_at((*path, *map(str, problem["loc"])), by_path)
                if option is not None and problem["type"] not in ("missing", "extra_forbidden"):
                    raise ConfigError(f"{option.flag} (or {option.envvar}): {reason(problem)}") from None


def _option_at(loc: tuple[str, ...], by_path: Mapping[tuple[str, ...], ConfigOption]) -> ConfigOption | None:
    """The option whose field `loc` is, or is inside (an item of a list field)."""
    return next((by_path[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in by_path), None)


def with_defaults(fields: dict, options: Iterable[ConfigOption]) -> dict:
    """`fields` with every config option's model default filled in where none was given."""
    filled = json.loads(json.dumps(fields, default=str))
    for option in options:
        if option.target != "config" or option.required:
            continue
        place = filled
        for part in option.path[:-1]:
            place = place.setdefault(part, {})
        place.setdefault(option.path[-1], list(option.default) if isinstance(option.default, tuple) else option.default)
    return filled


def unknown_variables(environ: Mapping[str, str], options: Iterable[ConfigOption]) -> list[str]:
    """One message per ACTEX_* variable that names no option, with the likely intended one."""
    known = {o.envvar for o in options} | {CONFIG_ENV}
    messages = []
    for name in sorted(n for n in environ if n.startswith(ENV_PREFIX) and n not in known | OTHER_VARIABLES):
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        messages.append(f"ignoring environment variable {name}: no such option{hint}")
    return messages
