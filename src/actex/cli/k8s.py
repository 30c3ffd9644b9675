"""`actex k8s render fleet.yaml`: the Kubernetes Job (or JobSet) that runs a fleet on GKE."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
import yaml

from actex.cli.errors import user_errors

app = typer.Typer(help="Kubernetes manifests for actex fleets (GKE, TPU node pools).", no_args_is_help=True)


@app.command("render")
def render_command(
    spec_path: Path = typer.Argument(..., metavar="FLEET_YAML", help="The fleet: name, image, workers, tpu, extract options (see docs/engines.md)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the manifest here instead of stdout."),
) -> None:
    """An Indexed Job of single-host workers, or a JobSet (and a NetworkPolicy for its JAX
    coordinator) when a TPU slice spans several hosts.

    Apply it with `kubectl apply -f`; watch the run with `actex status RUN_URL`.
    """
    from pydantic import ValidationError

    from actex.cli.options import extract_options
    from actex.config import ConfigError, load_config_file, one_line
    from actex.fleet.k8s import FleetSpec, render

    with user_errors():
        fields = load_config_file(spec_path)
        try:
            spec = FleetSpec.model_validate(fields)
        except ValidationError as error:
            raise ConfigError(f"{spec_path}: {one_line(error).replace('invalid config field', 'field')}") from None
        known = {o.name: o.envvar for o in extract_options()} | {"config": "ACTEX_CONFIG"}
        try:
            manifest = render(spec, known)
        except ValueError as error:
            raise ConfigError(f"{spec_path}: {error}") from None
    text = yaml.safe_dump_all(manifest, sort_keys=False)
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text)


def register(root: typer.Typer) -> None:
    """Add `actex k8s ...` to the `actex` app."""
    root.add_typer(app, name="k8s")
