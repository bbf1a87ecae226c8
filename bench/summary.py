"""One Markdown line per benchmark invocation, from the results.json files run.py writes
(code: the commit measured, + when tasks/ had uncommitted changes).

    python bench/summary.py bench/results/*/results.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def _median(values: list[float]) -> float:
    values = [v for v in values if v is not None and v == v]
    return statistics.median(values) if values else float("nan")


def _f(value: float, digits: int = 0) -> str:
    return "–" if value != value else f"{value:,.{digits}f}"


def line(path: Path) -> str:
    data = json.loads(path.read_text())
    runs = data["runs"]
    cmd = data["command"].removeprefix("python bench/run.py ")

    def med(key: str) -> float:
        return _median([r.get(key) for r in runs])

    def cpu(stage: str) -> float:
        return _median(
            [1e6 * r["cpu_seconds"].get(stage, float("nan")) / max(1, r["sent"]) for r in runs]
        )

    def ratio(r: dict) -> float:
        return r["steady_rps"] / r["baseline_rps"] if r.get("baseline_rps") else float("nan")

    per_row = cpu("worker") + cpu("database") + cpu("database background") + cpu("broker")
    code = data["facts"].get("code", "?")
    code = code.split(" ")[0] + ("+" if "uncommitted" in code else "")
    return (
        f"| `{cmd}` | {code} | {len(runs)} | {_f(med('steady_rps'))} | {_f(med('drain_rps'))} | "
        f"{_f(med('baseline_rps'), 1)} | {_f(_median([ratio(r) for r in runs]))}× | "
        f"{_f(_median([1000 * r['stage_p50']['claim'] for r in runs]))} | "
        f"{_f(med('rss_pool_mb'))} / {_f(med('rss_main_mb'))} | "
        f"{_f(cpu('worker'))} / {_f(cpu('database'))} / {_f(cpu('emulator'))} | "
        f"{_f(2e6 / per_row if per_row == per_row and per_row else float('nan'))} | "
        f"{_f(_median([r['cpu_cores'].get('other processes') for r in runs]), 2)} |"
    )


HEADER = (
    "| command (`python bench/run.py …`) | code | runs | rows/s steady | rows/s drain | baseline rows/s "
    "| steady ÷ baseline | claim ms/batch p50 | peak RSS MB pool / main | CPU µs per row "
    "worker / database / emulator | CPU-bound ceiling rows/s (2 cores) | other processes' CPU "
    "(cores) |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
)


def main(paths: list[str]) -> int:
    print(HEADER)
    for p in paths:
        print(line(Path(p)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
