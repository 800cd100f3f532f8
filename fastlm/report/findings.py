"""Findings in words, generated from a report's numbers: a summary a student could quote, and per varied field a
few sentences on perplexity and training time, the direction, its size and whether it is beyond seed noise.

Every sentence is built from the point groups (fastlm.report.groups) and says no more than they do: a
difference within seed noise is called that, a point with one seed has no verdict, flagged runs are named.
"""

from __future__ import annotations

from typing import Optional

from fastlm.report.groups import field_groups, find_group
from fastlm.report.replicates import compare, verdict
from fastlm.report.tables import cell_label

PPL_WORDS = ("lower", "higher")
TIME_WORDS = ("faster", "slower")


def ppl(stats: Optional[dict]) -> str:
    if stats is None:
        return "no result"
    return f"{stats['mean']:,.0f}" + (f" +- {stats['std']:,.0f}" if stats["n"] > 1 else "")


def secs(stats: Optional[dict]) -> str:
    if stats is None:
        return "no result"
    return f"{stats['mean']:,.0f}" + (f" +- {stats['std']:,.0f}" if stats["n"] > 1 else "") + " s"


def setting_text(settings: dict) -> str:
    return ", ".join(f"{name} {value}" for name, value in settings.items())


def pair_sentences(group: dict) -> list[str]:
    """For each pair of cells at one settings: perplexity and training time, with verdicts."""
    lines = []
    for pair in group["comparisons"]:
        a, b = pair["cells"]
        label = cell_label(b)
        vs = f"than {cell_label(a)}"
        lines.append(f"validation perplexity {cell_label(a)} {ppl(group['cells'][a]['best_val_ppl'])}, {label} "
                     f"{ppl(group['cells'][b]['best_val_ppl'])}: {verdict(pair['val_ppl'], label, PPL_WORDS)} "
                     f"{vs}; training time {secs(group['cells'][a]['train_seconds'])} against "
                     f"{secs(group['cells'][b]['train_seconds'])}: "
                     f"{verdict(pair['train_seconds'], label, TIME_WORDS, unit=' s')}")
    return lines


def field_findings(report: dict, field: str) -> list[str]:
    rows = field_groups(report["runs"], field, report["cells"], report["baseline"])
    if len(rows) < 2:
        return [f"{field}: fewer than two values to compare; no finding."]
    lines = []
    for cell in report["cells"]:
        # The values this cell has results at (an unfinished study may lack some).
        found = [(row["value"], row["cells"][cell]) for row in rows if row["cells"][cell]["best_val_ppl"]]
        if len(found) < 2:
            continue
        values, stats = [value for value, _ in found], [stats for _, stats in found]
        trend = ", ".join(f"{ppl(s['best_val_ppl'])} at {field} {v}" for s, v in zip(stats, values))
        first, last = stats[0], stats[-1]
        change_ppl = compare(first["best_val_ppl"], last["best_val_ppl"])
        change_time = compare(first["train_seconds"], last["train_seconds"])
        time_words = ""
        if change_time and change_time["relative"] is not None:
            time_words = (f"; training time {secs(first['train_seconds'])} -> {secs(last['train_seconds'])} "
                          f"({change_time['relative']:+.0%})")
        lines.append(f"{cell_label(cell)}: validation perplexity {trend}. From {field} {values[0]} to {values[-1]}: "
                     f"{verdict(change_ppl, 'perplexity', PPL_WORDS)}{time_words}.")
    for row in rows:
        lines += [f"At {field} {row['value']}: {sentence}." for sentence in pair_sentences(row)]
    return lines or [f"{field}: no cell has results at two of its values yet; no finding."]


def tally(groups: list[dict]) -> list[str]:
    """Across every settings: how often each second cell is lower / faster, and how often beyond noise."""
    counts: dict = {}
    for group in groups:
        for pair in group["comparisons"]:
            key = tuple(pair["cells"])
            entry = counts.setdefault(key, {"n": 0, "lower": 0, "lower_beyond": 0, "higher_beyond": 0,
                                            "faster": 0, "time_beyond": 0})
            if pair["val_ppl"] is None:
                continue
            entry["n"] += 1
            lower = pair["val_ppl"]["difference"] < 0
            entry["lower"] += lower
            entry["lower_beyond"] += bool(lower and pair["val_ppl"]["beyond"])
            entry["higher_beyond"] += bool(not lower and pair["val_ppl"]["beyond"])
            if pair["train_seconds"] is not None:
                entry["faster"] += pair["train_seconds"]["difference"] < 0
                entry["time_beyond"] += bool(pair["train_seconds"]["beyond"])
    lines = []
    for (a, b), e in counts.items():
        if not e["n"]:
            continue
        lines.append(f"Over all {e['n']} settings, {cell_label(b)} has the lower validation perplexity at "
                     f"{e['lower']} ({e['lower_beyond']} beyond seed noise) and the higher at {e['n'] - e['lower']} "
                     f"({e['higher_beyond']} beyond seed noise); it trains faster than {cell_label(a)} at "
                     f"{e['faster']} and slower at {e['n'] - e['faster']} ({e['time_beyond']} of these time "
                     f"differences beyond seed noise).")
    return lines


def summary(report: dict, groups: list[dict], baseline: Optional[dict]) -> list[str]:
    lines = []
    base = find_group(groups, baseline or {}) if baseline is not None or not report["varied"] else None
    if base is not None and base["comparisons"]:
        where = f"At the baseline ({setting_text(baseline)})" if baseline else "Over the runs"
        lines.append(f"{where}: " + "; ".join(pair_sentences(base)) + ".")
    lines += tally(groups)
    flagged = sorted({name for group in groups for cell in group["cells"].values() for name in cell["flagged"]})
    if flagged:
        lines.append(f"{len(flagged)} run(s) flagged (validation rose beyond its noise or the loss spiked), kept "
                     f"in the means and listed under Flagged runs: {', '.join(flagged)}.")
    failed = sorted({name for group in groups for cell in group["cells"].values() for name in cell["failed"]})
    if failed:
        lines.append(f"{len(failed)} run(s) failed and are left out of the means: {', '.join(failed)}.")
    return lines


def findings(report: dict, groups: list[dict], baseline: Optional[dict]) -> dict:
    """{"summary": sentences, "fields": {field: sentences}}."""
    return {"summary": summary(report, groups, baseline),
            "fields": {field: field_findings(report, field) for field in report["varied"]}}
