"""The `actex monitor` dashboard: a FleetSnapshot drawn as a rich table (pure: same snapshot,
same text, so it is checked by a snapshot test)."""

from __future__ import annotations

from rich.console import Group
from rich.table import Column, Table
from rich.text import Text

from actex.fleet.monitor import PRUNE_AFTER_S, printable
from actex.fleet.recovery import FleetSnapshot

_STATE_STYLE = {"READY": "green", "CREATING": "yellow", "PREEMPTED": "red", "TERMINATED": "red", "NOT_FOUND": "red", "DELETING": "magenta"}


def duration(seconds: float | None) -> str:
    """12 -> '12s', 754 -> '12m34s', 7380 -> '2h03m'; None -> '-'."""
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def render(snapshot: FleetSnapshot) -> Group:
    """Header (run progress, totals, ETA), one row per VM, the count of heartbeats left out
    as gone (`FleetSnapshot.pruned`), then any API or store errors.
    Names and errors pass through `printable`: no escape sequence reaches the terminal."""
    s = snapshot
    share = f"{100 * s.chunks_committed / s.chunks_total:.1f}%" if s.chunks_total else "-"
    status = "complete" if s.complete else f"ETA {duration(s.eta_s)}"
    header = Text.assemble(
        (f"fleet {s.fleet}", "bold"), f"  run {s.run}\n",
        f"chunks {s.chunks_committed}/{s.chunks_total} ({share}), {s.chunks_leased} leased  "
        f"samples {s.samples:,}  tokens {s.tokens:,}  {s.tokens_per_s:,.0f} tok/s  ", (status, "bold"),
    )
    table = Table("VM", "zone", "state", Column("heartbeat", justify="right"), *(Column(h, justify="right") for h in ("chunks", "samples", "tokens", "tok/s", "repairs")),
                  "action", box=None, pad_edge=False)
    for vm in s.vms:
        table.add_row(
            printable(vm.name), printable(vm.zone), Text(printable(vm.state), style=_STATE_STYLE.get(vm.state, "")),
            "-" if vm.heartbeat_age_s is None else f"{duration(vm.heartbeat_age_s)} ago",
            str(vm.chunks), f"{vm.samples:,}", f"{vm.tokens:,}", f"{vm.tokens_per_s:,.0f}", str(vm.repairs), vm.action or "",
        )
    parts = [header, table]
    if s.pruned:
        shown = ", ".join(printable(w) for w in s.pruned[:3]) + (", ..." if len(s.pruned) > 3 else "")
        parts.append(Text(f"{len(s.pruned)} heartbeat(s) of gone workers not shown (process gone, or no beat for "
                          f"{duration(PRUNE_AFTER_S)}): {shown}", style="dim"))
    parts += [Text(printable(error), style="red") for error in s.errors]
    return Group(*parts)
