"""The `actex` command. Each area registers its subcommands from its own module; what lives
here is only how the command presents itself: type labels, usage errors, help text."""

import inspect

import click
import rich.table
import rich.text
import typer
import typer.core
import typer.rich_utils

from actex.cli import data, demo, errors, extract, fleet, generate, inspect_run, k8s, reader, tpu


def _type_label(option: typer.core.TyperOption, ctx) -> str | None:
    # Typer labels every option with its type, flags too ("--claim <bool>"), which reads as
    # if the flag took a value. Flags take none: no label. (One place, so options generated
    # from the config models get it too.)
    return None if option.is_flag else _typer_type_label(option, ctx)


_typer_type_label = typer.core.TyperOption.display_type_rich
typer.core.TyperOption.display_type_rich = _type_label


def _usage_error_line(error: click.ClickException) -> None:
    # A mistyped flag, value or variable is the user's input like any other: one line
    # `actex: error: ...` (exit 2, click's code), not typer's boxed panel.
    message = error.format_message()
    param = getattr(error, "param", None)
    if isinstance(error, typer.BadParameter) and getattr(param, "envvar", None) and param.opts:
        # Click says "Invalid value for '--dtype' (env var: 'ACTEX_DTYPE')" whichever was
        # given: name both the way every other refused value is named.
        message = f"{param.opts[0]} (or {param.envvar}): {error.message}"
    message = " ".join(message.split()).replace("Value error, ", "")
    ctx = getattr(error, "ctx", None)
    hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    typer.echo(f"actex: error: {message}{hint}", err=True)


typer.rich_utils.rich_format_error = _usage_error_line


class _WholeNamesTable(rich.table.Table):
    """Typer's help tables, whose columns rich squeezes at 80 columns into cut names
    (`--predictions-per-t…`, `ACTEX_MAX_SEQ_LE…`). A flag's negative form goes on the line
    under it (typer gives it a column of its own: two flag columns left no room for help),
    flag columns keep their whole width, and the type and help columns wrap at spaces,
    folding only a word longer than the column."""

    # typer's option row ends with: long flags, short flags, negative long, negative short, type, help.
    LONG, NEGATIVE = -6, -4

    def add_row(self, *renderables, **kwargs) -> None:
        cells = list(renderables)
        if len(cells) >= -self.LONG and all(isinstance(cells[i], rich.text.Text) for i in (self.LONG, self.NEGATIVE)):
            if cells[self.NEGATIVE].plain:
                cells[self.LONG] = rich.text.Text.assemble(cells[self.LONG], "\n", cells[self.NEGATIVE])
                cells[self.NEGATIVE] = rich.text.Text("")
        super().add_row(*cells, **kwargs)
        *names, _types, _help = self.columns
        for column in names:
            column.no_wrap = True
        for text in getattr(cells[-1], "renderables", [cells[-1]]):  # typer's help: Columns of Text
            if isinstance(text, rich.text.Text):
                text.overflow = "fold"


typer.rich_utils.Table = _WholeNamesTable

app = typer.Typer(
    name="actex",
    help="Extract decoder-LLM activations exactly once into local disk, GCS or S3, and read them back.\n\n"
    + errors.EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for area in (extract, demo, inspect_run, generate, data, reader, fleet, k8s, tpu):
    area.register(app)


def unwrap(doc: str) -> str:
    """A docstring as help text: the lines of each paragraph joined, so that the terminal,
    not the source's 90-column wrapping, decides where lines break. Lines that start a
    list item or are indented (examples, tables) keep their own line."""
    paragraphs = []
    for block in doc.split("\n\n"):
        lines = block.splitlines()
        out = lines[:1]
        for line in lines[1:]:
            if line.startswith((" ", "-", "*", "|")) or out[-1].startswith((" ", "|")):
                out.append(line)
            else:
                out[-1] += " " + line.strip()
        paragraphs.append("\n".join(out))
    return "\n\n".join(paragraphs)


def _unwrap_help(typer_app: typer.Typer) -> None:
    for info in typer_app.registered_commands:
        if info.help is None and info.callback is not None and info.callback.__doc__:
            info.help = unwrap(inspect.getdoc(info.callback))
    for group in typer_app.registered_groups:
        _unwrap_help(group.typer_instance)


_unwrap_help(app)
