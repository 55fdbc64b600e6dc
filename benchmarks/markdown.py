"""Markdown pieces shared by the benchmark report's sections: tables, verdicts, the machine line, the clock note."""

from __future__ import annotations

US = 1e6  # seconds → microseconds


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def machine_line(result: dict) -> str:
    m = result["machine"]
    load = m.get("load_average") or ["?"]
    after = m.get("load_average_after") or ["?"]
    return (
        f"{m['cpu']}, {m['cpu_count']} cores, {m['torch_threads']} torch thread(s); torch {m['torch']}, diffusers "
        f"{m['diffusers']}, accelerate {m['accelerate']}; {m['date_utc']} UTC, revision {m['git_revision']}; "
        f"load average (1 min) {load[0]} before, {after[0]} after; profile `{result['profile']}`, "
        f"{result['wall_seconds'] / 60:.1f} min"
    )


# ---------------------------------------------------------------------------------------------------- clocks


def other(clock: str) -> str:
    return "cpu" if clock == "wall" else "wall"


def clock_note(result: dict) -> str:
    clock = result["clock"]
    if clock == "wall":
        return "Verdicts and tables use wall-clock time (the machine was quiet); CPU-time ratios are the cross-check."
    return (
        "**The machine was loaded** (1-minute load average ≥ 1.5 before or after this benchmark, see above): tables "
        "and verdicts use this process's CPU time, which other processes barely change; wall-clock ratios are shown "
        "for comparison."
    )
