"""The closing summary of a run: each stage's wall time, rows and drops, where every result is, what to run next.

The same figures are saved in `run.json` under "summary", so a script reads what a person reads.
"""

from __future__ import annotations

import sys

from rose_pl.config import RunArgs
from rose_pl.layout import COMPARE_MD, RunLayout
from rose_pl.pipeline.stages import RunManifest
from rose_pl.selection.report import REPORT_FILE


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    m, s = divmod(seconds, 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def collect(args: RunArgs, done: dict[str, str]) -> dict:
    """The summary as data: stages (status, seconds, rows, dropped), selections, reports, comparison."""
    layout = RunLayout(args.output_dir)
    manifest = RunManifest(layout.root)
    stages, timed_groups = [], set()
    for name, status in done.items():
        entry = manifest.entry(name) or {}
        figures = entry.get("figures") or {}
        reasons = sorted({d.get("reason", "dropped") for d in figures.get("dropped_rows", []) if isinstance(d, dict)})
        group = tuple(entry.get("group") or ())
        shared = bool(group) and group in timed_groups  # one pass for several stages: its time is counted once
        timed_groups.add(group)
        stages.append({"stage": name, "status": status, "seconds": None if shared else entry.get("seconds"),
                       "shared_pass": shared, "rows": figures.get("rows"), "dropped": figures.get("dropped"),
                       "truncated_rows": figures.get("truncated_rows"),
                       "truncated_tokens": figures.get("truncated_tokens"), "drop_reasons": reasons})
    selections = []
    for name in done:
        parts = name.split("/")
        if len(parts) == 4 and parts[0] == "targets" and parts[2] == "selection":
            figures = (manifest.entry(name) or {}).get("figures") or {}
            selections.append({"target": parts[1], "method": parts[3],
                               "file": figures.get("file") or str(layout.selected(parts[1], parts[3])),
                               "report": str(layout.selection(parts[1], parts[3]) / REPORT_FILE),
                               "selected": figures.get("selected")})
    return {"output_dir": str(layout.root), "scoring": manifest.data.get("scoring"), "stages": stages,
            "selections": selections, "comparison": str(layout.compare_md) if layout.compare_md.is_file() else None,
            "wall_seconds": sum(s["seconds"] or 0 for s in stages if s["status"] == "ran")}


def render(summary: dict, rerun: str) -> str:
    rows = summary["stages"]
    width = max([len(r["stage"]) for r in rows] + [5])
    lines = [f"Run {summary['output_dir']}: {sum(r['status'] == 'ran' for r in rows)} stages ran "
             f"({_duration(summary['wall_seconds'])}), {sum(r['status'] == 'skipped' for r in rows)} were done already; "
             f"gradient scoring: {summary['scoring'] or 'none (no gradient method)'}", "",
             f"  {'stage':<{width}}  {'status':<7}  {'wall':>7}  {'rows':>7}  {'dropped':>7}  {'truncated':>20}"]
    for r in rows:
        dropped = "" if r["dropped"] in (None, 0) else str(r["dropped"])
        reasons = f"  ({'; '.join(r['drop_reasons'])[:80]})" if r["drop_reasons"] else ""
        wall = "shared" if r.get("shared_pass") else _duration(r["seconds"])
        cut = "" if not r.get("truncated_rows") else f"{r['truncated_rows']} rows, {r['truncated_tokens']} tok"
        lines.append(f"  {r['stage']:<{width}}  {r['status']:<7}  {wall:>7}  "
                     f"{'' if r['rows'] is None else r['rows']:>7}  {dropped:>7}  {cut:>20}{reasons}")
    if summary["selections"]:
        lines += ["", "Selections (the pool's own rows, best first) and their reports:"]
        for s in summary["selections"]:
            lines.append(f"  {s['target']}/{s['method']}: {s['file']} ({s['selected']} rows); report {s['report']}")
    if summary["comparison"]:
        lines += ["", f"Comparison of every method and target: {summary['comparison']}"]
    lines += ["", f"Rerun or extend (finished stages are skipped; a new target computes only its own stages): {rerun}"]
    return "\n".join(lines)


def save_summary(args: RunArgs, done: dict[str, str]) -> dict:
    """Collect the summary and save it in run.json (by the process that holds the run's lock); returns it."""
    summary = collect(args, done)
    RunManifest(args.output_dir).set("summary", summary)
    return summary


def print_summary(args: RunArgs, done: dict[str, str], argv: list[str] | None = None, stream=None) -> dict:
    """Print the summary (and the comparison table) as the run saved it; returns it."""
    summary = RunManifest(args.output_dir).data.get("summary") or collect(args, done)
    rerun = "rose-pl run " + " ".join(argv) if argv else f"rose-pl run --output_dir {args.output_dir} ..."
    stream = stream or sys.stdout
    if summary["comparison"]:
        print(RunLayout(args.output_dir).path(COMPARE_MD).read_text(), file=stream)
    print(render(summary, rerun), file=stream, flush=True)
    return summary
