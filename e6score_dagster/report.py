"""What a user reads after a run: the model comparison table, a few log lines, the run summary.

Plain strings, no Dagster: the assets put them into metadata (markdown) and the log.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

# (metric key as in model/metrics.py::predictive_metrics, column header); lower NLL is better.
TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("val_nll", "val NLL"),
    ("nll", "NLL"),
    ("spearman", "Spearman"),
    ("mae", "MAE"),
    ("coverage_50", "cov 50%"),
    ("coverage_80", "cov 80%"),
    ("coverage_95", "cov 95%"),
)
# Dagster's UI shows a markdown entry inline only below this many characters.
INLINE_MARKDOWN_CHARS = 1000


def sig(value: float | None, digits: int = 4) -> str:
    """`value` rounded to `digits` significant digits, never in exponent notation."""
    if value is None or not isinstance(value, int | float) or not math.isfinite(value):
        return "–"
    if value == 0:
        return "0"
    places = digits - 1 - math.floor(math.log10(abs(value)))
    return f"{round(value, places):.{max(places, 0)}f}"


def comparison_table_md(
    candidates: Mapping[str, Mapping[str, float]], chosen: str, n_posts: int | None = None
) -> str:
    """One markdown table, a row per candidate or baseline (in the given order), the chosen
    one in bold and ticked; columns no row has are left out. Compact, so that the UI shows it
    inline (under INLINE_MARKDOWN_CHARS for half a dozen rows)."""
    columns = [(k, h) for k, h in TABLE_COLUMNS if any(k in m for m in candidates.values())]
    lines = [
        "| model | " + " | ".join(h for _, h in columns) + " |",
        "|---|" + "--:|" * len(columns),
    ]
    for name, metrics in candidates.items():
        label = f"**{name}** ✓" if name == chosen else name
        lines.append(f"| {label} | " + " | ".join(sig(metrics.get(k)) for k, _ in columns) + " |")
    held_out = f" on {n_posts:,} held-out posts" if n_posts else " on held-out posts"
    note = (
        f"✓ in use. Scores{held_out}; NLL of log1p(favs), lower is better; "
        "cov: share inside the central interval."
    )
    return "\n".join(lines) + "\n\n" + note


def gain_over(candidates: Mapping[str, Mapping[str, float]], chosen: str, baseline: str) -> float:
    """How much lower the chosen model's held-out NLL is than `baseline`'s (nan if unknown)."""
    try:
        return float(candidates[baseline]["nll"]) - float(candidates[chosen]["nll"])
    except KeyError:
        return float("nan")


def not_kept_sentence(stage: str, best_step: int | None) -> str:
    why = (
        "no step improved its validation NLL on its starting point"
        if best_step == 0
        else "it did not improve on the stage before it"
    )
    return f"The {stage} stage was not kept: {why}, so the model predicts what its start does."


def summary_lines(
    candidates: Mapping[str, Mapping[str, float]],
    chosen: str,
    best_steps: Mapping[str, int] | None = None,
    kept: Mapping[str, bool] | None = None,
    n_posts: int | None = None,
) -> list[str]:
    """A few lines for the run log that say what the table says."""
    held_out = f" on {n_posts:,} held-out posts" if n_posts else ""
    ranking = ", ".join(
        f"{name} {sig(m.get('nll'))}" + (" (chosen)" if name == chosen else "")
        for name, m in candidates.items()
    )
    best = candidates.get(chosen, {})
    lines = [f"held-out NLL{held_out}, lower is better: {ranking}"]
    chosen_line = f"chosen: {chosen}, NLL {sig(best.get('nll'))}"
    gain = gain_over(candidates, chosen, "linear")
    if chosen != "linear" and math.isfinite(gain):
        chosen_line += f" ({sig(gain, 3)} better than linear)"
    chosen_line += (
        f", Spearman {sig(best.get('spearman'))}, MAE {sig(best.get('mae'))} favs, "
        f"80% interval covers {sig(100 * best.get('coverage_80', float('nan')), 3)}%"
    )
    lines.append(chosen_line)
    if best_steps:
        kept = kept or {}
        lines.append(
            "stages: "
            + ", ".join(
                f"{s} best at step {step}" + ("" if kept.get(s, True) else " (not kept)")
                for s, step in best_steps.items()
            )
        )
    return lines


def run_summary_lines(
    dump_date: str, posts: int, database: str, csv_export: str, parquet_export: str | None
) -> list[str]:
    """The end of a headless run: what was made, where it is, what to try next."""
    exports = csv_export + (f" and {parquet_export}" if parquet_export else "")
    return [
        f"scored {posts:,} posts of the dump of {dump_date}",
        f"table scored_posts in {database}; export {exports}",
        "next: python -m e6score_dagster.top --k 20   (the best posts, with e621 search URLs)",
        "      dg dev -m e6score_dagster -h 127.0.0.1   (the asset graph, metrics and plots)",
    ]
