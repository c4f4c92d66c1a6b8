"""The shared machinery of resumable experiment grids (experiments._lib.cells)."""

import json
import math
import os

import pytest

from experiments._lib import cells


def _runner(losses):
  calls = []

  def run(lr, seed):
    calls.append((lr, seed))
    return {"loss": losses(lr, seed)}
  return run, calls


def test_tune_lr_extends_past_an_edge_and_stops_inside():
  # A bowl with its minimum at 0.8: a grid of [0.1, 0.2, 0.4] is extended to 0.8 and 1.6, then stops.
  run, calls = _runner(lambda lr, seed: (math.log2(lr / 0.8)) ** 2 + 0.01 * seed)
  best, tried = cells.tune_lr(run, [0.4, 0.1, 0.2], [0, 1], score=lambda r: r["loss"], max_extend=3, what="x")
  assert best == 0.8 and sorted(tried) == [0.1, 0.2, 0.4, 0.8, 1.6]
  assert len(calls) == 10  # every rate once per seed, none twice


def test_tune_lr_scores_the_mean_over_seeds_and_skips_diverged():
  # Seed 1 diverges at 0.4: its mean is inf, so 0.2 wins although seed 0 is best at 0.4.
  table = {(0.1, 0): 3.0, (0.1, 1): 3.0, (0.2, 0): 2.0, (0.2, 1): 2.0, (0.4, 0): 1.0, (0.4, 1): math.inf}
  run, _ = _runner(lambda lr, seed: table[(lr, seed)])
  best, _ = cells.tune_lr(run, [0.1, 0.2, 0.4], [0, 1], score=lambda r: r["loss"], max_extend=0, what="x")
  assert best == 0.2


def test_tune_lr_waits_for_missing_runs_and_names_total_divergence():
  best, tried = cells.tune_lr(lambda lr, s: None, [1.0, 2.0], [0], score=lambda r: 0.0, max_extend=2, what="x")
  assert best is None and sorted(tried) == [1.0, 2.0]
  with pytest.raises(RuntimeError, match="signsgd diverged at every learning rate"):
    cells.tune_lr(lambda lr, s: {"loss": math.inf}, [1.0, 2.0], [0], score=lambda r: r["loss"],
                  max_extend=1, what="signsgd")


def test_store_is_atomic_and_corrupt_cells_are_moved_aside(tmp_path):
  store = cells.CellStore(tmp_path)
  store.store("a", {"x": 1})
  assert store.load("a") == {"x": 1} and store.load("b") is None
  assert not list(store.dir.glob("*.tmp-*"))
  (store.dir / "c.json").write_text('{"x": ')  # a run killed while writing by hand
  assert store.load("c") is None
  assert not (store.dir / "c.json").exists() and list(store.dir.glob("c.corrupt-*"))


def test_lock_refuses_a_live_holder_and_takes_a_stale_one(tmp_path):
  lock = cells.take_lock(tmp_path)
  assert lock.read_text() == str(os.getpid())
  lock.write_text("1")  # pid 1 is alive
  with pytest.raises(SystemExit, match="being trained by process 1"):
    cells.take_lock(tmp_path)
  lock.write_text("999999999")  # no such process: a stale lock
  assert cells.take_lock(tmp_path).read_text() == str(os.getpid())


def test_check_config_refuses_other_settings_by_flag(tmp_path):
  class A:
    steps, lrs = 800, "1e-3"
  cells.check_config(A, tmp_path, ("steps", "lrs"))
  assert json.loads((tmp_path / "config.json").read_text()) == {"steps": 800, "lrs": "1e-3"}
  cells.check_config(A, tmp_path, ("steps", "lrs"))  # the same settings resume
  A.steps = 2400
  with pytest.raises(SystemExit, match=r"--steps 800 there, 2400 now"):
    cells.check_config(A, tmp_path, ("steps", "lrs"))


def test_soap_shampoo_wall_clock_steps_come_from_the_interleaved_timing(tmp_path, monkeypatch):
  # Equal wall-clock: each optimizer gets steps * t_adamw / t_opt steps, with both times from the one timing cell
  # (not from the tuning runs, which ran at other moments under other load). No clock runs here: the timing
  # cell and the runs are fakes with fixed figures (0.1 / 0.25 against the runs' 99.0), and the step counts
  # asserted below are what the timing cell's figures give.
  from experiments import soap_shampoo as ss
  args = ss.parse_args(["--optimizers", "adamw,soap", "--seeds", "0", "--lrs", "1e-3,2e-3,4e-3",
                        "--max-extend", "0", "--out", str(tmp_path)])
  grid, requested = ss.Grid(args, tmp_path), []

  def fake_run(cell, *, dry):
    requested.append(cell)
    return {"diverged": False, "final_val_loss": abs(math.log2(cell.lr / 2e-3)) + 3.0, "steps": cell.steps,
            "seconds_per_step": 99.0, "opt_state_bytes": 1, "val_curve": [], "wall_s": 1.0}
  monkeypatch.setattr(grid, "run", fake_run)
  timing_cell = {"seconds_per_step": {"adamw": 0.1, "soap": 0.25}}
  monkeypatch.setattr(grid, "timing", lambda tuned, dry: timing_cell)
  state = grid.walk(dry=False)
  assert state["tuned"] == {"adamw": 2e-3, "soap": 2e-3}
  wall = [c for c in requested if c.kind == "wallclock"]
  assert [(c.optimizer, c.steps) for c in wall] == [("soap", round(args.steps * 0.1 / 0.25))]
  claim = [c for c in requested if c.kind == "claim"]  # 65% of AdamW's time: SOAP's claimed saving
  assert [(c.optimizer, c.steps) for c in claim] == [("soap", round(ss.CLAIMED_WALLCLOCK * args.steps * 0.1 / 0.25))]
  with pytest.raises(SystemExit):
    ss.parse_args(["--timing-steps", "15"])  # not a multiple of the refresh interval


def test_run_grid_trains_under_the_lock_then_reports_and_report_only_trains_nothing(tmp_path):
  import argparse
  import time
  calls = []

  def walk(*, dry):
    calls.append((dry, (tmp_path / "run.lock").exists()))
    return {"dry": dry}

  def write_report(state):
    (tmp_path / "summary.md").write_text(f"state {state}")
  for report_only in (False, True):
    args = argparse.Namespace(report=report_only, steps=10)
    assert cells.run_grid("x", args, tmp_path, ["steps"], walk, write_report, argv=["--steps", "10"],
                          t_start=time.perf_counter()) == 0
  assert calls == [(False, True), (True, False), (True, False)]  # trained holding the lock; --report did not train
  assert not (tmp_path / "run.lock").exists() and (tmp_path / "summary.md").read_text() == "state {'dry': True}"
  logged = [json.loads(line) for line in (tmp_path / "invocations.jsonl").read_text().splitlines()]
  assert [r["command"] for r in logged] == ["python -m experiments.x --steps 10"]
  with pytest.raises(SystemExit, match="--steps 10 there, 20 now"):
    cells.run_grid("x", argparse.Namespace(report=True, steps=20), tmp_path, ["steps"], walk, write_report,
                   argv=[], t_start=0.0)


def test_soap_shampoo_is_complete_only_with_the_timing_and_every_comparison(tmp_path, monkeypatch):
  from experiments import soap_shampoo as ss
  args = ss.parse_args(["--optimizers", "adamw,soap", "--seeds", "0", "--lrs", "1e-3,2e-3,4e-3",
                        "--max-extend", "0", "--out", str(tmp_path)])
  grid = ss.Grid(args, tmp_path)
  monkeypatch.setattr(grid, "run", lambda cell, *, dry: {
      "diverged": False, "final_val_loss": abs(math.log2(cell.lr / 2e-3)) + 3.0, "steps": cell.steps,
      "seconds_per_step": 1.0, "opt_state_bytes": 1, "val_curve": [], "wall_s": 1.0})
  monkeypatch.setattr(grid, "timing", lambda tuned, dry: None)  # not measured yet
  assert not ss.analyse(grid.walk(dry=True), args)["complete"]
  monkeypatch.setattr(grid, "timing", lambda tuned, dry: {"seconds_per_step": {"adamw": 0.1, "soap": 0.2}})
  res = ss.analyse(grid.walk(dry=True), args)
  assert res["complete"] and res["comparisons"]["wallclock"]["soap"]["steps"] == round(args.steps / 2)
  assert res["comparisons"]["claim"]["soap"]["steps"] == round(ss.CLAIMED_WALLCLOCK * args.steps / 2)
