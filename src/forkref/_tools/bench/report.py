"""The bench's outputs: a JSON document, a rich table, a matplotlib chart.

All three are made from one :class:`BenchReport`. rich and matplotlib are
optional (the ``demo`` extra): :func:`need` imports one or says how to
install it, and the command line calls it before the (long) run starts.
"""

from __future__ import annotations

import importlib
import textwrap
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any

from forkref._errors import Error
from forkref._tools.bench.registry import WORKLOADS, Config
from forkref._tools.bench.runner import Outcome

__all__ = ["SCHEMA", "BenchReport", "need", "plot", "table"]

#: Version of the JSON document's layout; bumped when a field changes meaning.
SCHEMA = 1
_INSTALL = "pip install 'forkref[demo]'"
_MIB = 2**20


class MissingDependencyError(Error):
    """An optional package a requested output needs is not installed."""


def need(module: str, what: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.partition(".")[0]
        raise MissingDependencyError(
            f"{what} needs {top}, which is not installed: {_INSTALL} (or pip install {top})"
        ) from err


@dataclass(frozen=True)
class BenchReport:
    """One ``forkref bench`` run: what was asked, where it ran, and every outcome."""

    command: str
    config: Config
    machine: dict[str, Any]
    versions: dict[str, str | None]
    outcomes: tuple[Outcome, ...]

    @property
    def exit_code(self) -> int:
        """1 when an answer was WRONG or a method failed with an error, else 0."""
        return 1 if any(o.status in ("WRONG", "error") for o in self.outcomes) else 0

    def as_dict(self) -> dict[str, Any]:
        """The JSON document (``--json``)."""
        return {
            "schema": SCHEMA,
            "command": self.command,
            "config": asdict(self.config),
            "machine": self.machine,
            "versions": self.versions,
            "workloads": [
                {
                    "name": name,
                    "title": WORKLOADS[name].title(self.config),
                    "tasks": WORKLOADS[name].tasks(self.config),
                    "reference": "forkref",
                }
                for name in self.config.workloads
            ],
            "results": [_outcome_dict(o) for o in self.outcomes],
            "exit_code": self.exit_code,
        }

    def caption(self) -> str:
        """Machine, versions and command, for the chart."""
        m = self.machine
        installed = ", ".join(
            f"{k} {v}"
            for k, v in self.versions.items()
            if v and k in ("numpy", "pandas", "joblib", "mpire", "ray")
        )
        return (
            f"{m['cores']} cores, {m['memory_bytes'] / 2**30:.0f} GiB, {m['cpu']}; "
            f"{m['os']}; Python {m['python']}, forkref {self.versions.get('forkref')}, "
            f"{installed}\n" + "\n".join(textwrap.wrap("$ " + self.command, 150))
        )


def _outcome_dict(o: Outcome) -> dict[str, Any]:
    data = asdict(o)
    data["workers"] = [asdict(w) for w in o.workers]
    data["verified"] = o.verified
    data["scaled"] = o.tasks_run < o.tasks
    return data


# -- table -------------------------------------------------------------------------


def _seconds(o: Outcome) -> str:
    if o.seconds_full is None:
        return "-"
    star = "*" if o.tasks_run < o.tasks else ""
    return f"{o.seconds_full:.3f}{star}"


def _times(ratio: float) -> str:
    return f"{ratio:,.0f}x" if ratio >= 10 else f"{ratio:.2f}x"


def _ratio(o: Outcome) -> str:
    if o.ratio is None:
        return "-"
    return "1.00x (ref)" if o.method == "forkref" else _times(o.ratio)


def _memory(o: Outcome, field: str) -> str:
    values = [getattr(w, field) for w in o.workers]
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    if len(values) <= 3:
        return " / ".join("?" if v is None else f"{v / _MIB:,.0f}" for v in values)
    return f"max {max(known) / _MIB:,.0f} ({len(values)} workers)"


def _status(o: Outcome) -> str:
    if o.status == "ok":
        return "[green]ok[/]"
    if o.status == "WRONG":
        return f"[bold red]WRONG[/]: {o.reason}"
    if o.status == "timeout":
        return f"[yellow]timeout[/]: {o.reason}"
    return f"[red]error[/]: {o.reason}"


_HEADERS = (
    ("method", "left"),
    ("time s", "right"),
    ("vs forkref", "right"),
    ("worker peak USS MiB", "right"),
    ("worker peak PSS MiB", "right"),
    ("check", "left"),
)


def table(report: BenchReport) -> Any:
    """A rich renderable: a table per workload, then notes on what was skipped and why."""
    rich_table = need("rich.table", "the bench table")
    group = need("rich.console", "the bench table").Group
    parts: list[Any] = []
    for name in report.config.workloads:
        ran = [o for o in report.outcomes if o.workload == name and _ran(o)]
        if not ran:
            continue
        t = rich_table.Table(
            title=WORKLOADS[name].title(report.config), title_justify="left", min_width=100
        )
        for header, justify in _HEADERS:
            t.add_column(header, justify=justify)
        for o in ran:
            t.add_row(
                ("[bold]" if o.method == "forkref" else "") + o.label,
                _seconds(o),
                _ratio(o),
                _memory(o, "peak_uss"),
                _memory(o, "peak_pss"),
                _status(o),
            )
        parts.append(t)
    return group(*parts, *_notes(report))


def _ran(o: Outcome) -> bool:
    return o.status not in ("skipped", "n/a")


def _notes(report: BenchReport) -> list[str]:
    notes = [
        f"{report.config.workers} workers per pool; stdlib Pool = multiprocessing.Pool (fork); "
        "time covers pool start, map and end except for the trivial tasks (map only); "
        "memory: each worker's peak while it ran, sampled every 0.25 s and after the map"
    ]
    if any(o.tasks_run < o.tasks for o in report.outcomes if o.seconds is not None):
        notes.append(
            f"* pickles the data for every task: ran {report.config.pickled_tasks} of the "
            "tasks, once; the map's time is scaled to the full count, the pool start counted once"
        )
    skipped: dict[str, list[str]] = {}
    for o in report.outcomes:
        if o.status == "skipped":
            skipped.setdefault(f"{o.label}: {o.reason}", []).append(o.workload)
    for text, workloads in skipped.items():
        notes.append(f"skipped {text} [dim]({', '.join(workloads)})[/]")
    return notes


# -- chart --------------------------------------------------------------------------

_COLORS = {"forkref": "#d62728", "other_forkref": "#ff9896", "other": "#7f7f7f"}


def _color(o: Outcome) -> str:
    if o.method == "forkref":
        return _COLORS["forkref"]
    return _COLORS["other_forkref"] if "forkref" in o.label else _COLORS["other"]


def plot(report: BenchReport, path: str) -> None:
    """Write the chart: per workload, time (log scale) and worker memory per method."""
    matplotlib = need("matplotlib", "--plot")
    matplotlib.use("Agg")  # files only; no display needed
    plt = need("matplotlib.pyplot", "--plot")
    rows = [
        (name, [o for o in report.outcomes if o.workload == name and o.seconds_full])
        for name in report.config.workloads
    ]
    rows = [(name, ran) for name, ran in rows if ran]
    if not rows:
        raise MissingDependencyError("--plot: no method finished, nothing to draw")
    height = sum(0.42 * len(ran) + 0.9 for _, ran in rows) + 1.5
    fig, axes = plt.subplots(
        len(rows),
        2,
        figsize=(13, height),
        squeeze=False,
        gridspec_kw={"height_ratios": [len(ran) + 1 for _, ran in rows], "width_ratios": [3, 2]},
    )
    for (name, ran), (ax_time, ax_mem) in zip(rows, axes, strict=True):
        _time_panel(ax_time, ran, WORKLOADS[name].title(report.config))
        _memory_panel(ax_mem, ran)
    caption = report.caption()
    lines = caption.count("\n") + 1
    fig.suptitle(
        "forkref bench: time and worker memory per method (shorter is better)",
        x=0.01, ha="left", fontsize=11,
    )
    fig.text(0.01, 0.005, caption, fontsize=7.5, va="bottom", family="monospace")
    fig.tight_layout(rect=(0, (0.2 + 0.16 * lines) / height, 1, 1 - 0.45 / height))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _time_panel(ax: Any, ran: list[Outcome], title: str) -> None:
    labels = [o.label + ("*" if o.tasks_run < o.tasks else "") for o in ran]
    values = [o.seconds_full or 0.0 for o in ran]
    y = range(len(ran))
    ax.barh(y, values, color=[_color(o) for o in ran])
    ax.set_xscale("log")
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9, loc="left")
    ax.set_xlabel("seconds (log scale; * = scaled from fewer tasks)", fontsize=8)
    low, high = min(values), max(values)
    ax.set_xlim(low / 2, high * 12)
    for i, o in enumerate(ran):
        text = f"{o.seconds_full:.3g} s"
        if o.ratio is not None and o.method != "forkref":
            text += f"  {_times(o.ratio)}"
        if o.status == "WRONG":
            text += "  WRONG"
        ax.text(values[i] * 1.08, i, text, va="center", fontsize=7.5,
                color="red" if o.status == "WRONG" else "black")


def _memory_panel(ax: Any, ran: list[Outcome]) -> None:
    uss = [_peak(o, "peak_uss") for o in ran]
    pss = [_peak(o, "peak_pss") for o in ran]
    y = list(range(len(ran)))
    ax.set_yticks(y, [""] * len(ran))
    ax.invert_yaxis()
    if not any(v is not None for v in uss + pss):
        ax.text(0.5, 0.5, "memory not measured here", ha="center", va="center",
                transform=ax.transAxes, fontsize=8, color="gray")
        ax.set_xticks([])
        return
    ax.barh([i - 0.2 for i in y], [v or 0 for v in pss], height=0.4, color="#1f77b4", label="PSS")
    ax.barh([i + 0.2 for i in y], [v or 0 for v in uss], height=0.4, color="#aec7e8", label="USS")
    top = max(v or 0 for v in uss + pss)
    ax.set_xlim(0, top * 1.3 if top else 1)
    for i in y:
        for value, dy in ((pss[i], -0.2), (uss[i], 0.2)):
            if value is not None:
                ax.text(value + top * 0.01, i + dy, f"{value:,.0f}", va="center", fontsize=7)
    ax.set_xlabel("largest worker's peak memory, MiB", fontsize=8)
    ax.legend(fontsize=7, loc="lower right")


def _peak(o: Outcome, field: str) -> float | None:
    known = [getattr(w, field) for w in o.workers if getattr(w, field) is not None]
    return max(known) / _MIB if known else None

