"""Markdown table and PNG plots of the convergence benchmark, from the raw results of run.py
(``training_raw.json``). A loss of ``None`` in the raw results is a diverged run (+∞)."""

from __future__ import annotations

import math
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np

INF = math.inf
NAMES = {"sgd": "SGD-momentum", "adam": "Adam", "kfac": "K-FAC (libkfac)", "peer": "K-FAC (curvlinops)",
         "adaptive": "K-FAC adaptive (untuned)", "kfac-sua": "K-FAC SUA (libkfac)",
         "kfac-grouped": "K-FAC grouped (libkfac)"}
COLOURS = {"sgd": "tab:blue", "adam": "tab:orange", "kfac": "tab:green", "peer": "tab:red", "adaptive": "tab:purple",
           "kfac-sua": "tab:olive", "kfac-grouped": "tab:cyan"}
#: The methods of the main tables and plots, in order (each only where the raw results have it).
MAIN_METHODS = ("sgd", "adam", "kfac", "kfac-sua", "kfac-grouped", "adaptive")
#: The K-FAC methods of the headline table, each compared with SGD-momentum and Adam.
KFAC_METHODS = ("kfac", "kfac-sua", "kfac-grouped", "adaptive")
SECOND_NAMES = {"momentum": "momentum", "beta1": "β1", "damping": "λ"}
GOAL_ITERATIONS, GOAL_SECONDS = 10.0, 3.0


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def _loss(value) -> float:
    return INF if value is None else float(value)


def median(values: Sequence[float]) -> float:
    """Median where +∞ counts as a value (a seed that never got there)."""
    values = sorted(values)
    if not values:
        return INF
    middle = len(values) // 2
    if len(values) % 2:
        return values[middle]
    low, high = values[middle - 1], values[middle]
    return INF if INF in (low, high) else 0.5 * (low + high)


def final_losses(runs) -> List[float]:
    return [_loss(r["final_loss"]) for r in runs]


def reach(run, target: float) -> Tuple[float, float, float]:
    """(iterations, CPU seconds, wall seconds) at the first curve point with loss ≤ target, or
    (∞, ∞, ∞)."""
    for iterations, loss, cpu, wall in run["curve"]:
        if loss is not None and loss <= target:
            return float(iterations), float(cpu), float(wall)
    return INF, INF, INF


def setting_label(problem: str, batch: int) -> str:
    return f"{problem}, batch {'full' if batch <= 0 else batch}"


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------


def fmt(value: float, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if value == INF:
        return "∞"
    if abs(value) >= 1000 or (abs(value) < 1e-3 and value != 0):
        return f"{value:.3g}"
    return f"{value:.{digits}g}"


def fmt_lr(value: float) -> str:
    return f"{value:.3g}"


def spread(values: Sequence[float], digits: int = 4) -> str:
    """median [min–max]."""
    finite = [v for v in values if v != INF]
    text = fmt(median(values), digits)
    if len(values) > 1:
        low = fmt(min(values), digits)
        high = fmt(max(values), digits)
        text += f" [{low}–{high}]"
    if len(finite) < len(values):
        text += f" ({len(values) - len(finite)}/{len(values)} ∞)"
    return text


def ratio(numerator: float, denominator: float, who: str = "K-FAC") -> str:
    if denominator == INF and numerator == INF:
        return "neither reaches L*"
    if denominator == INF:
        return f"{who} does not reach L*"
    if numerator == INF:
        return "> T (other does not reach L*)"
    if denominator == 0:
        return "∞"
    return f"{numerator / denominator:.2f}×"


def config_text(best: Dict, second: str) -> str:
    return f"lr {fmt_lr(best['lr'])}, {SECOND_NAMES.get(second, second)} {best[second]:g}"


# ---------------------------------------------------------------------------------------------
# Per-setting summaries
# ---------------------------------------------------------------------------------------------


def summarise_settings(raw) -> List[Dict]:
    """Groups the tuning results by (problem, batch) and computes L* and the reach statistics."""
    groups: Dict[Tuple[str, int], Dict] = {}
    for entry in list(raw["settings"]) + list(raw.get("adaptive") or []):
        key = (entry["problem"], entry["batch"])
        groups.setdefault(key, dict(problem=entry["problem"], batch=entry["batch"], T=entry["T"],
                                    eval_every=entry["eval_every"], methods={}))["methods"][entry["method"]] = entry
    summaries = []
    for key, group in groups.items():
        sgd = group["methods"]["sgd"]
        target = median(final_losses(sgd["runs"]))
        group["L*"] = target
        for method, entry in group["methods"].items():
            reached = [reach(run, target) for run in entry["runs"]]
            entry["iterations"] = [r[0] for r in reached]
            entry["seconds"] = [r[1] for r in reached]
            entry["wall_seconds"] = [r[2] for r in reached]
            entry["iterations_median"] = median(entry["iterations"])
            entry["seconds_median"] = median(entry["seconds"])
            entry["step_ms"] = median([r["step_ms_mean"] for r in entry["runs"] if r["step_ms_mean"] is not None])
        # Protocol 2: K-FAC's budget T_K may be below SGD-momentum's and Adam's T.
        group["T_K"] = max((e["T"] for m, e in group["methods"].items() if m in KFAC_METHODS), default=group["T"])
        group["T"] = group["methods"]["sgd"]["T"]
        summaries.append(group)
    return summaries


def _gain(numerator: float, denominator: float) -> float:
    if denominator == 0:
        return INF
    return numerator / denominator if denominator != INF else 0.0


def budget_text(group) -> str:
    return f"{group['T']}" if group["T_K"] == group["T"] else f"{group['T']} / {group['T_K']}"


def goals_table(summaries) -> str:
    """The headline (Protocol 2): per setting and K-FAC method, iterations and CPU seconds to L*
    of SGD-momentum, Adam and the method, and the method's ratios against both, met or missed."""
    lines = [
        "| problem, batch | K-FAC method | T / T_K | L* | iterations to L*: SGD-m / Adam / K-FAC "
        "| CPU seconds to L*: SGD-m / Adam / K-FAC | SGD-m / K-FAC iterations (goal ≥ 10×) "
        "| SGD-m / K-FAC seconds (goal ≥ 3×) | Adam / K-FAC iterations | Adam / K-FAC seconds (goal > 1×) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    mark = lambda ok: "met" if ok else "missed"
    for group in summaries:
        m = group["methods"]
        if not all(k in m for k in ("sgd", "adam")):
            continue
        for method in KFAC_METHODS:
            if method not in m:
                continue
            it = [m[k]["iterations_median"] for k in ("sgd", "adam", method)]
            sec = [m[k]["seconds_median"] for k in ("sgd", "adam", method)]
            lines.append(
                f"| {setting_label(group['problem'], group['batch'])} | {NAMES[method]} | {budget_text(group)} "
                f"| {fmt(group['L*'])} | {' / '.join(fmt(v) for v in it)} | {' / '.join(fmt(v, 3) for v in sec)} "
                f"| {ratio(it[0], it[2])} ({mark(_gain(it[0], it[2]) >= GOAL_ITERATIONS)}) "
                f"| {ratio(sec[0], sec[2])} ({mark(_gain(sec[0], sec[2]) >= GOAL_SECONDS)}) "
                f"| {ratio(it[1], it[2])} "
                f"| {ratio(sec[1], sec[2])} ({mark(_gain(sec[1], sec[2]) > 1.0)}) |"
            )
    return "\n".join(lines)


def mnist1d_anchor_text(raw, summaries) -> str:
    """The MNIST-1D paper's test accuracies beside this benchmark's (median over seeds)."""
    paper = raw.get("mnist1d_paper_accuracy")
    groups = [g for g in summaries if g["problem"].endswith("mnist1d")]
    if not paper or not groups:
        return ""
    lines = ["| problem, batch | " + " | ".join(NAMES[m] for m in MAIN_METHODS) + " |",
             "|---|" + "---|" * len(MAIN_METHODS)]
    for group in groups:
        cells = []
        for method in MAIN_METHODS:
            entry = group["methods"].get(method)
            accuracy = [r["test"]["accuracy"] for r in entry["runs"] if r.get("test")] if entry else []
            cells.append(spread([100 * a for a in accuracy], 3) + " %" if accuracy else "–")
        lines.append(f"| {setting_label(group['problem'], group['batch'])} | " + " | ".join(cells) + " |")
    anchor = ", ".join(f"{name} {100 * value:.0f} %" for name, value in paper.items())
    return ("Test accuracy on MNIST-1D's 1000 test sequences (median [min–max] over seeds) after each "
            "method's budget. Anchor — the test accuracies the MNIST-1D paper reports for its models "
            f"(Greydanus 2020, \"Scaling down deep learning\", arXiv:2011.14439): {anchor}. The paper "
            "trained longer and with its own settings; these runs stop at T (SGD-m, Adam) or T_K (K-FAC) "
            "and are tuned for the training loss, not for test accuracy.\n\n" + "\n".join(lines))


def adaptive_goals_table(summaries) -> str:
    """The goals of issue 4 for K-FAC's adaptive mode (untuned) against the tuned SGD-momentum
    and Adam of the same settings, and against the tuned fixed-damping K-FAC."""
    lines = [
        "| problem, batch | T / T_K | L* | iterations to L*: adaptive | CPU seconds to L*: adaptive "
        "| vs SGD-m: iterations (goal ≥ 10×) | vs SGD-m: seconds (goal ≥ 3×) | Adam / adaptive seconds (goal > 1×) "
        "| tuned K-FAC / adaptive: iterations, seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = 0
    for group in summaries:
        m = group["methods"]
        if not all(k in m for k in ("sgd", "adam", "adaptive")):
            continue
        rows += 1
        a_it, a_sec = m["adaptive"]["iterations_median"], m["adaptive"]["seconds_median"]
        s_it, s_sec = m["sgd"]["iterations_median"], m["sgd"]["seconds_median"]
        adam_sec = m["adam"]["seconds_median"]
        gain = lambda num, den: num / den if den not in (0, INF) else (INF if den == 0 else 0.0)
        mark = lambda ok: "met" if ok else "missed"
        kfac = "–"
        if "kfac" in m:
            kfac = (f"{ratio(m['kfac']['iterations_median'], a_it, 'adaptive')}, "
                    f"{ratio(m['kfac']['seconds_median'], a_sec, 'adaptive')}")
        lines.append(
            f"| {setting_label(group['problem'], group['batch'])} | {budget_text(group)} | {fmt(group['L*'])} "
            f"| {fmt(a_it)} | {fmt(a_sec, 3)} "
            f"| {ratio(s_it, a_it, 'adaptive')} ({mark(gain(s_it, a_it) >= GOAL_ITERATIONS)}) "
            f"| {ratio(s_sec, a_sec, 'adaptive')} ({mark(gain(s_sec, a_sec) >= GOAL_SECONDS)}) "
            f"| {ratio(adam_sec, a_sec, 'adaptive')} ({mark(gain(adam_sec, a_sec) > 1.0)}) | {kfac} |"
        )
    return "\n".join(lines) if rows else ""


def adaptive_choices_table(summaries) -> str:
    """What the adaptive mode chose: λ and γ at the end, median α, μ and ρ (median [range] over
    seeds of each run's value; ρ over the steps that evaluated it, those whose report adjusts λ)."""
    lines = ["| problem, batch | final λ | smallest λ | final γ | γ changes | median α | median μ | median ρ (λ's steps) |",
             "|---|---|---|---|---|---|---|---|"]
    rows = 0
    for group in summaries:
        entry = group["methods"].get("adaptive")
        if entry is None:
            continue
        stats = [r.get("adaptive") or {} for r in entry["runs"]]
        column = lambda key, digits=3: spread([s[key] for s in stats if s.get(key) is not None], digits) \
            if any(s.get(key) is not None for s in stats) else "–"
        rows += 1
        lines.append(f"| {setting_label(group['problem'], group['batch'])} | {column('damping_final')} "
                     f"| {column('damping_min')} | {column('factor_damping_final')} "
                     f"| {column('factor_damping_changes')} | {column('alpha_median')} | {column('mu_median')} "
                     f"| {column('rho_median')} |")
    return "\n".join(lines) if rows else ""


def adaptive_settings_text(raw) -> str:
    mode = raw.get("adaptive_mode")
    if not mode:
        return "K-FAC's adaptive mode was not run (results from before it was part of the benchmark)."
    if not mode["available"]:
        return "K-FAC's adaptive mode: not available in this library version; its rows are omitted."
    o = mode["options"]
    gamma = (f"γ re-chosen every T2 = {o['factor_damping_period']} steps among γ, γ·ω2, γ/ω2 "
             f"(ω2 = {o['factor_damping_decay']:g}^T2)" if mode["gamma_rechoice"] else
             f"**γ fixed at γ0** (no γ re-choice: {mode['gamma_note']})")
    return (f"K-FAC adaptive (untuned): the same fixed settings for every problem, from Martens & Grosse "
            f"2015 — λ0 = {o['damping']:g}, Levenberg–Marquardt every T1 = {o['lm_interval']} steps with "
            f"ω1 = {o['lm_decay']:g}^T1, γ0 = {o['factor_damping']:g} (this library's γ; M&G's √γ), {gamma}, "
            f"inverses every T3 = {o['inverse_update_period']} steps, factor decay {o['factor_decay']:g}, "
            f"Cholesky with π, sampled Fisher; α and μ from the quadratic model, no learning rate, no KL "
            f"clip. One adaptive step = one iteration; its time includes the forward-mode products and the "
            f"loss evaluated after the update.")


def detail_table(summaries) -> str:
    lines = [
        "| problem, batch | method | tuned configuration | final training loss | iterations to L* | seconds to L* (CPU) "
        "| wall-clock seconds to L* | ms per step (CPU, mean) | test accuracy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for group in summaries:
        for method in MAIN_METHODS:
            entry = group["methods"].get(method)
            if entry is None:
                continue
            if method == "adaptive":
                config = "untuned (fixed settings, see above)"
            else:
                config = config_text(entry["best"], entry["second"])
            if entry.get("edge"):
                config += " (edge: no lr beyond it tried)"
            if entry.get("second_from"):
                config += f" ({SECOND_NAMES.get(entry['second'], entry['second'])} from {entry['second_from']})"
            accuracy = [r["test"]["accuracy"] for r in entry["runs"] if r.get("test")]
            accuracy_text = spread([100 * a for a in accuracy], 3) + " %" if accuracy else "–"
            lines.append(
                f"| {setting_label(group['problem'], group['batch'])} | {NAMES[method]} | {config} "
                f"| {spread(final_losses(entry['runs']))} | {spread(entry['iterations'])} "
                f"| {spread(entry['seconds'], 3)} | {spread(entry['wall_seconds'], 3)} "
                f"| {fmt(entry['step_ms'], 3)} | {accuracy_text} |"
            )
    return "\n".join(lines)


def tuning_table(raw) -> str:
    screened = any("T_screen" in entry for entry in raw["settings"])
    header = ("training loss (seed 0) by learning rate after T_screen iterations → after T for the screen's "
              "survivors; * = chosen" if screened else "final training loss (seed 0) by learning rate; * = chosen")
    lines = ([f"| problem, batch | method | T_screen / T | second | {header} |", "|---|---|---|---|---|"] if screened
             else [f"| problem, batch | method | second | {header} |", "|---|---|---|---|"])
    for entry in raw["settings"]:
        second = entry["second"]
        by_value: Dict[float, List] = {}
        for point in entry["grid"]:
            by_value.setdefault(point[second], []).append(point)
        budget = f"{entry.get('T_screen', entry['T'])} / {entry['T']}"
        for value, points in by_value.items():
            cells = []
            for point in sorted(points, key=lambda p: p["lr"]):
                chosen = point["lr"] == entry["best"]["lr"] and value == entry["best"][second]
                if "screen_loss" in point:
                    text = fmt(_loss(point["screen_loss"]))
                    if point.get("final_loss") is not None:
                        text += f" → {fmt(_loss(point['final_loss']))}"
                else:
                    text = fmt(_loss(point["final_loss"]))
                cells.append(f"{fmt_lr(point['lr'])}: {text}{'*' if chosen else ''}")
            lines.append(f"| {setting_label(entry['problem'], entry['batch'])} | {NAMES[entry['method']]} "
                         f"{'| ' + budget + ' ' if screened else ''}"
                         f"| {SECOND_NAMES.get(second, second)} {value:g} | {', '.join(cells)} |")
    return "\n".join(lines)


def sweep_table(raw) -> Tuple[str, Dict]:
    sweeps = [s for s in raw["sweep"] if s]
    if not sweeps:
        return "(not run)", {}
    profile = raw["profile_settings"]["sweep"]
    table: Dict[int, Dict[str, List]] = {}
    for sweep in sweeps:
        for run in sweep["runs"]:
            table.setdefault(run["task"]["batch"], {}).setdefault(sweep["method"], []).append(run)
    methods = [s["method"] for s in sweeps]
    lines = ["| batch | " + " | ".join(f"{NAMES[m]}: loss after {profile['T']} iterations" for m in methods)
             + " | " + " | ".join(f"{NAMES[m]}: ms per step" for m in methods) + " |",
             "|---|" + "---|" * (2 * len(methods))]
    for batch in sorted(table, key=lambda b: (b <= 0, b)):
        row = table[batch]
        losses = [spread(final_losses(row.get(m, []))) for m in methods]
        times = [fmt(median([r["step_ms_mean"] for r in row.get(m, []) if r["step_ms_mean"]]), 3) for m in methods]
        lines.append(f"| {'full' if batch <= 0 else batch} | " + " | ".join(losses) + " | " + " | ".join(times) + " |")
    configs = "; ".join(f"{NAMES[s['method']]}: lr {fmt_lr(s['best']['lr'])}, "
                        + ", ".join(f"{SECOND_NAMES.get(k, k)} {v:g}" for k, v in s["best"].items() if k != "lr")
                        for s in sweeps)
    return "\n".join(lines) + f"\n\nConfigurations (tuned at batch {profile['tuned_at']}): {configs}.", table


def ablation_table(raw, summaries) -> str:
    ablation = raw.get("ablation")
    if not ablation:
        return "(not run)"
    profile = raw["profile_settings"]["ablation"]
    group = next((g for g in summaries if g["problem"] == profile["problem"] and g["batch"] == profile["batch"]), None)
    target = group["L*"] if group else INF
    lines = [f"K-FAC at lr {fmt_lr(ablation['best']['lr'])}, λ {ablation['best']['damping']:g} "
             f"(tuned), {setting_label(profile['problem'], profile['batch'])}, L* = {fmt(target)} "
             f"(SGD-momentum's), {len(next(iter(ablation['rows'].values())))} seeds.",
             "",
             "| variant | final training loss | iterations to L* | seconds to L* | ms per step | steps with the KL clip active |",
             "|---|---|---|---|---|---|"]
    for name in raw["ablation_names"]:
        runs = ablation["rows"].get(name)
        if not runs:
            continue
        reached = [reach(run, target) for run in runs]
        clipped = [r.get("kl_clipped_fraction") for r in runs if r.get("kl_clipped_fraction") is not None]
        lines.append(f"| {name} | {spread(final_losses(runs))} | {spread([r[0] for r in reached])} "
                     f"| {spread([r[1] for r in reached], 3)} "
                     f"| {fmt(median([r['step_ms_mean'] for r in runs if r['step_ms_mean']]), 3)} "
                     f"| {fmt(100 * median(clipped), 3) + ' %' if clipped else '–'} |")
    if "adaptive_rows" in raw:  # raw results from before the adaptive mode was driven
        availability = ("the library has it (`libkfac.Optimizer.solve_step_size` exists) but this benchmark does not "
                        "drive it yet: pending" if ablation["adaptive_available"]
                        else "not available in this library version")
        for name in raw["adaptive_rows"]:
            lines.append(f"| {name} | {availability} | | | | |")
    return "\n".join(lines)


def adaptive_ablation_table(raw, summaries) -> str:
    ablation = raw.get("adaptive_ablation")
    mode = raw.get("adaptive_mode")
    if not ablation:
        if mode and not mode["available"]:
            return "Not available in this library version."
        return "(not run)"
    group = next((g for g in summaries if g["problem"] == ablation["problem"] and g["batch"] == ablation["batch"]), None)
    target = group["L*"] if group else INF
    main = group["methods"].get("adaptive") if group else None
    rows = dict(ablation["rows"])
    names = list(raw["adaptive_ablation_names"])
    if main is not None:
        rows[names[0]] = main["runs"]
    if mode and not mode.get("gamma_rechoice"):  # the baseline ran with γ fixed: say so
        label = "adaptive (untuned: LM + α/μ, γ fixed at γ0 — no γ re-choice in this library version; the main table's runs)"
        rows[label] = rows.pop(names[0], [])
        names[0] = label
    kfac = group["methods"].get("kfac") if group else None
    if kfac is not None:
        name = (f"α/μ, LM and γ all off = fixed-damping K-FAC (tuned lr {fmt_lr(kfac['best']['lr'])}, "
                f"λ {kfac['best']['damping']:g}, KL clip; the main table's runs)")
        rows[name] = kfac["runs"]
        names.append(name)
    lines = [f"{setting_label(ablation['problem'], ablation['batch'])}, L* = {fmt(target)} (SGD-momentum's), "
             f"{len(next(iter(rows.values()))) if rows else 0} seeds, every other setting as in the adaptive row.",
             "",
             "| variant | final training loss | iterations to L* | seconds to L* | ms per step | final λ | final γ | median α | median μ |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        if name in ablation.get("notes", {}):
            lines.append(f"| {name} | {ablation['notes'][name]} | | | | | | | |")
            continue
        runs = rows.get(name)
        if not runs:
            continue
        reached = [reach(run, target) for run in runs]
        stats = [r.get("adaptive") or {} for r in runs]
        column = lambda key: spread([s[key] for s in stats if s.get(key) is not None], 3) \
            if any(s.get(key) is not None for s in stats) else "–"
        lines.append(f"| {name} | {spread(final_losses(runs))} | {spread([r[0] for r in reached])} "
                     f"| {spread([r[1] for r in reached], 3)} "
                     f"| {fmt(median([r['step_ms_mean'] for r in runs if r['step_ms_mean']]), 3)} "
                     f"| {column('damping_final')} | {column('factor_damping_final')} "
                     f"| {column('alpha_median')} | {column('mu_median')} |")
    return "\n".join(lines)


def peer_table(raw, summaries) -> str:
    peers = [p for p in raw["peer"] if p]
    if not peers:
        return "(not run)"
    lines = ["| problem, batch | method | ms per step (CPU, mean) | SGD-momentum step (ms) | overhead over SGD (ms) "
             "| loss after T_peer steps | KL clip active |",
             "|---|---|---|---|---|---|---|"]
    verdicts, checks = [], []
    for peer in peers:
        group = next((g for g in summaries if g["problem"] == peer["problem"] and g["batch"] == peer["batch"]), None)
        sgd_ms = group["methods"]["sgd"]["step_ms"] if group else INF
        overheads = {}
        label = setting_label(peer["problem"], peer["batch"])
        for key in ("kfac", "peer"):
            runs = peer[key]
            step = median([r["step_ms_mean"] for r in runs if r["step_ms_mean"]])
            overheads[key] = step - sgd_ms
            clipped = [r.get("kl_clipped_fraction") for r in runs if r.get("kl_clipped_fraction") is not None]
            lines.append(f"| {label} | {NAMES[key]}, factors of the current batch, inverses every step "
                         f"| {fmt(step, 3)} | {fmt(sgd_ms, 3)} | {fmt(overheads[key], 3)} "
                         f"| {spread(final_losses(runs))} (T_peer = {peer['T']}) "
                         f"| {fmt(100 * median(clipped), 3) + ' %' if clipped else '–'} |")
        if group:
            kfac = group["methods"]["kfac"]
            lines.append(f"| {label} | {NAMES['kfac']} at the benchmark's settings (β 0.95, Ti 20), for reference "
                         f"| {fmt(kfac['step_ms'], 3)} | {fmt(sgd_ms, 3)} | {fmt(kfac['step_ms'] - sgd_ms, 3)} | – | – |")
        share = overheads["kfac"] / overheads["peer"] if overheads["peer"] > 0 else INF
        verdicts.append(f"{label}: libkfac's per-step overhead is {fmt(share, 3)} of curvlinops' "
                        f"({'met' if share <= 0.5 else 'missed'}: goal ≤ 0.5)")
        check = peer["check"]
        checks.append(f"{label}, λ {check['damping']:g}: relative difference of the directions "
                      f"{fmt(check['relative_difference_f32'], 3)} in float32 "
                      f"({fmt(check['relative_difference_f64'], 3)} in float64), cosine {check['cosine_f32']:.7f}")
    return ("\n".join(lines) + "\n\n" + "\n".join(f"- {v}" for v in verdicts)
            + "\n\nSame-settings check (one batch, empirical Fisher, factors of that batch, π damping, "
              "no KL clip):\n\n" + "\n".join(f"- {c}" for c in checks))


def contention_text(raw) -> str:
    """How much the wall-clock of the training steps exceeded their CPU time (other processes
    sharing the cores), over every training run."""
    ratios = []
    runs = [r for e in raw["settings"] for r in e["runs"]]
    runs += [r for s in raw["sweep"] if s for r in s["runs"]]
    if raw.get("ablation"):
        runs += [r for rs in raw["ablation"]["rows"].values() for r in rs]
    runs += [r for e in raw.get("adaptive") or [] for r in e["runs"]]
    if raw.get("adaptive_ablation"):
        runs += [r for rs in raw["adaptive_ablation"]["rows"].values() for r in rs]
    for p in raw["peer"]:
        if p:
            runs += p["kfac"] + p["peer"]
    for run in runs:
        if run.get("train_seconds") and run.get("train_wall_seconds"):
            ratios.append(run["train_wall_seconds"] / run["train_seconds"])
    if not ratios:
        return ""
    ratios = np.array(ratios)
    return (f"Wall-clock / CPU time of the training steps over {len(ratios)} runs: median "
            f"{np.median(ratios):.2f}, 90th percentile {np.percentile(ratios, 90):.2f}, max {ratios.max():.2f} "
            f"(1.00 = the run had its core to itself).")


def threads_table(raw) -> str:
    rows = raw.get("threads") or []
    if not rows:
        return "(not measured)"
    lines = ["| OpenBLAS threads | PyTorch threads | libkfac threads | method | wall-clock ms per step (median) |",
             "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['openblas_threads']} | {row['torch_threads']} | {row['kfac_threads']} "
                     f"| {NAMES[row['method']]} | {fmt(row['step_ms_median'], 3)} |")
    first = rows[0]
    return (f"{setting_label(first['problem'], first['batch'])}, {first['steps']} steps after 3 warm-up steps, "
            "one process alone on the machine:\n\n" + "\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _median_curve(runs, x_index: int):
    """Median over seeds of (x, loss) at each curve point index, with min and max of the loss."""
    curves = [r["curve"] for r in runs if r["curve"]]
    if not curves:
        return None
    length = max(len(c) for c in curves)
    xs, mid, low, high = [], [], [], []
    for i in range(length):
        points = [c[i] for c in curves if i < len(c)]
        losses = [_loss(p[1]) for p in points]
        if len(points) * 2 <= len(curves):  # fewer than half the seeds still running
            break
        xs.append(float(np.median([p[x_index] for p in points])))
        mid.append(median(losses))
        low.append(min(losses))
        high.append(max([l for l in losses if l != INF] or [INF]))
    return np.array(xs), np.array(mid), np.array(low), np.array(high)


def plot_curves(summaries, path: str, x_index: int, xlabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(summaries)
    columns = min(4, count)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    for axis, group in zip(axes.flat, summaries):
        top, bottom = -INF, INF
        for method in MAIN_METHODS:
            entry = group["methods"].get(method)
            curve = _median_curve(entry["runs"], x_index) if entry else None
            if curve is None:
                continue
            xs, mid, low, high = curve
            finite = np.isfinite(mid)
            axis.plot(xs[finite], mid[finite], color=COLOURS[method], label=NAMES[method], lw=1.4)
            band = np.isfinite(high) & np.isfinite(low)
            axis.fill_between(xs[band], low[band], high[band], color=COLOURS[method], alpha=0.2, lw=0)
            if finite.any():
                top = max(top, float(mid[finite][0]))
                bottom = min(bottom, float(np.nanmin(low[np.isfinite(low)])))
        axis.axhline(group["L*"], color="black", ls="--", lw=0.8, label="L* (SGD-m final, median)")
        if group["problem"].startswith(("mlp", "cnn")):  # losses go to ~1e-6: log scale
            axis.set_yscale("log")
        elif math.isfinite(top) and math.isfinite(bottom) and top > bottom:
            axis.set_ylim(bottom - 0.05 * (top - bottom), top + 0.05 * (top - bottom))
        axis.set_title(setting_label(group["problem"], group["batch"]), fontsize=10)
        axis.set_xlabel(xlabel, fontsize=8)
        axis.set_ylabel("training loss")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[count:]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=7)
    figure.suptitle("Median over seeds, band = min–max", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_sweep(raw, table, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not table:
        return
    full = raw["profile_settings"]["sweep"]
    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    batches = sorted(table, key=lambda b: (b <= 0, b))
    # The full batch is drawn at the training-set size (or, for raw results without it, one
    # octave past the largest mini-batch).
    examples = next((r.get("examples") for runs in table.values() for rs in runs.values() for r in rs
                     if r.get("examples")), None)
    full_position = examples or 2 * max([b for b in batches if b > 0] or [1])
    positions = [b if b > 0 else full_position for b in batches]
    for method in ("sgd", "adam", "kfac"):
        mids, lows, highs = [], [], []
        for batch in batches:
            losses = final_losses(table[batch].get(method, []))
            mids.append(median(losses))
            finite = [l for l in losses if l != INF]
            lows.append(min(finite) if finite else np.nan)
            highs.append(max(finite) if finite else np.nan)
        mids = np.array(mids, dtype=float)
        mids[~np.isfinite(mids)] = np.nan
        axis.errorbar(positions, mids, yerr=[np.maximum(mids - np.array(lows), 0), np.maximum(np.array(highs) - mids, 0)],
                      color=COLOURS[method], label=NAMES[method], marker="o", ms=4, capsize=3)
    axis.set_xscale("log", base=2)
    axis.set_xticks(positions)
    axis.set_xticklabels([str(b) if b > 0 else "full" for b in batches])
    axis.set_xlabel("batch size")
    axis.set_ylabel(f"training loss after {full['T']} iterations")
    axis.set_title(f"{full['problem']}: batch-size sweep (median, min–max)", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def write_report(raw, out: str) -> str:
    """Writes training.md and the PNGs; returns the headline (goals) table."""
    summaries = summarise_settings(raw)
    goals = goals_table(summaries)
    sweep_text, sweep_data = sweep_table(raw)
    plot_curves(summaries, os.path.join(out, "training_loss_vs_iterations.png"), 0, "iterations")
    plot_curves(summaries, os.path.join(out, "training_loss_vs_seconds.png"), 2,
                "CPU seconds of the training steps (single-threaded runs)")
    plot_sweep(raw, sweep_data, os.path.join(out, "training_batch_sweep.png"))
    machine = raw["machine"]
    profile = raw["profile_settings"]
    runtime = raw.get("runtime_seconds") or 0.0
    omitted = profile.get("omitted") or []
    choices = adaptive_choices_table(summaries)
    if choices:
        choices = ("What the adaptive mode chose (median [min–max] over seeds of each run's value; "
                   "ρ = actual / predicted loss change):\n\n" + choices + "\n\n")
    protocol_link = os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md"),
                                    os.path.abspath(out))
    issue4 = ""
    if profile.get("sweep"):
        issue4 += f"""## Batch-size sweep ({profile['sweep']['problem']})

{sweep_text}{" K-FAC adaptive is not part of the sweep (budget, see the protocol)." if raw.get("adaptive") else ""}

![batch-size sweep](training_batch_sweep.png)

"""
    if profile.get("ablation"):
        issue4 += f"""## K-FAC ablations

{ablation_table(raw, summaries)}

### Adaptive mode

{adaptive_ablation_table(raw, summaries)}

"""
    if profile.get("peer"):
        issue4 += f"""## Peer: curvlinops-for-pytorch {machine['curvlinops']}

Same model, batches, seeds, lr, λ, momentum 0.9 and κ for both; overhead = K-FAC step − the
SGD-momentum step of the same problem and batch (from the tuned SGD-momentum runs).

{peer_table(raw, summaries)}

"""
    anchor = mnist1d_anchor_text(raw, summaries)
    if anchor:
        anchor = "## MNIST-1D: test accuracy\n\n" + anchor + "\n\n"
    text = f"""# Convergence benchmark results

Generated by `python3 benchmarks/training/run.py --profile {raw['profile']}{' --tuning halving' if raw.get('tuning') == 'halving' else ''}` (protocol:
[benchmarks/training/README.md]({protocol_link})); total runtime {int(runtime // 60)} min
{int(runtime % 60)} s with {raw['workers']} worker processes of one thread each.
{"Omitted in this profile: " + "; ".join(omitted) + "." if omitted else ""}

## Goals (issues 4 and 14)

L* = median over the seeds of SGD-momentum's final training loss after T iterations (tuned for
T). SGD-momentum and Adam run T iterations, every K-FAC method T_K (Protocol 2: K-FAC's budget
capped, tuned for T_K; not reaching L* by T_K counts as ∞). Iterations and seconds
are medians over {profile['seeds']} seeds (∞ = not reached by the median seed). Seconds are the
CPU time of the training steps, all K-FAC work included; every run is single-threaded, so this
is the wall-clock on a core of its own. The measured wall-clock (which also counts time other
processes took the core) is in the next table; see "Machine" for how much they differed.

{goals}

{adaptive_settings_text(raw)}
{chr(10) + adaptive_goals_table(summaries) + chr(10) if adaptive_goals_table(summaries) else ""}
## Per method

Final training loss, iterations and seconds to L*: median [min–max] over seeds.

{detail_table(summaries)}

{choices}![loss vs iterations](training_loss_vs_iterations.png)

![loss vs seconds](training_loss_vs_seconds.png)

{anchor}{issue4}## Tuning grids (seed 0{'; successive halving, Protocol 2.1: every point screened for T_screen iterations, the best two of the screen run T' if raw.get('tuning') == 'halving' else ''})

{tuning_table(raw)}

{"## Threads" + chr(10) + chr(10) + threads_table(raw) + chr(10) + chr(10) if raw.get("threads") else ""}## Machine and versions

- CPU: {machine['cpu']}, {machine['cores']} cores; load average at start {', '.join(f'{v:.2f}' for v in machine['load_average_start'])}, at end {', '.join(f'{v:.2f}' for v in machine.get('load_average_end') or [])}
- Python {machine['python']}, PyTorch {machine['torch']}, NumPy {machine['numpy']}, matplotlib {machine['matplotlib']}, mlxtend {machine['mlxtend']}, mnist1d {machine.get('mnist1d', 'not recorded')}, curvlinops-for-pytorch {machine['curvlinops']}
- libkfac {machine['libkfac']} from `{machine['libkfac_path']}`, bindings `{machine['bindings_path']}`, commit {machine['libkfac_commit']}{' (work tree with local changes)' if machine['libkfac_dirty'] else ''}; OpenBLAS `{machine['openblas']}`
- Date {machine['date']}
- {contention_text(raw)}
"""
    with open(os.path.join(out, "training.md"), "w") as file:
        file.write(text)
    return goals
