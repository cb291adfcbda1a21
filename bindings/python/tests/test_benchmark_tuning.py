"""The convergence benchmark's tuning rule (benchmarks/training/run.py): Protocol 2's full-budget
grid and the successive halving of Protocol 2.1, driven with a fake trainer whose final loss is a
known function of (learning rate, second value, budget)."""

import math
import os
import sys
import types

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "benchmarks", "training"))
run = pytest.importorskip("run")


def _fake_trainers():
    def make_task(problem, method, batch, T, eval_every, seed, lr, sparse_after=0, **options):
        return dict(problem=problem, method=method, batch=batch, T=T, eval_every=eval_every, seed=seed, lr=lr,
                    sparse_after=sparse_after, options=options)
    return types.SimpleNamespace(make_task=make_task)


def _loss(task, T_full):
    """Early in the budget large learning rates lead; at the full budget lr 1e-2 with momentum
    0.9 wins (a landscape where a quarter-budget screen misleads unless 1e-2 survives)."""
    lr, momentum = task["lr"], task["options"]["momentum"]
    late = task["T"] >= T_full
    best = 1e-2 if late else 1.0
    return abs(math.log10(lr) - math.log10(best)) + (0.0 if momentum == 0.9 else 0.6) + task["seed"] * 1e-3


def _drive(halving, T=400):
    generator = run.tuning_experiment(_fake_trainers(), "ae-digits", 256, T, 10, 0, "sgd", 3, halving=halving)
    budgets, value = [], None
    try:
        while True:
            request = generator.send(value)
            assert isinstance(request, list)  # no Need: ae-digits transfers nothing
            budgets.append([t["T"] for t in request])
            value = [dict(final_loss=_loss(t, T), diverged=False, seed=t["seed"]) for t in request]
    except StopIteration as done:
        return done.value, budgets


def test_grid_tuning_runs_every_point_for_the_full_budget():
    result, budgets = _drive(halving=False)
    assert budgets == [[400] * 10, [400] * 2, [400] * 2]  # grid, refinements, seeds 1–2
    assert result["best"] == {"lr": 1e-2, "momentum": 0.9}
    assert "T_screen" not in result and len(result["grid"]) == 12
    assert all(p["final_loss"] is not None for p in result["grid"])


def test_halving_screens_then_runs_the_best_two_for_the_full_budget():
    result, budgets = _drive(halving=True)
    # 10 screens and 2 refinement screens at T/4, then 2 survivors at T, then seeds 1–2.
    assert budgets == [[100] * 10, [100] * 2, [400] * 2, [400] * 2]
    assert result["T_screen"] == 100
    survivors = [p for p in result["grid"] if p["final_loss"] is not None]
    # The screen ranks lr 1 first, then 10^±0.5 around it (its refinements): lr 1e-2 is screened out,
    # so the chosen configuration is the better of the two survivors at the full budget.
    assert sorted(p["lr"] for p in survivors) == pytest.approx(sorted([1.0, 10 ** -0.5]))
    assert result["best"]["lr"] == pytest.approx(10 ** -0.5) and result["best"]["momentum"] == 0.9
    chosen = min(survivors, key=lambda p: p["final_loss"])
    assert result["runs"][0]["final_loss"] == chosen["final_loss"]
