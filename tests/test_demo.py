"""The demo (`python -m experiments.demo --quick`) end to end: outputs and their numbers agree."""

import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

import slimoptax
from experiments import demo
from experiments._lib import model


def test_demo_quick_writes_consistent_outputs(tmp_path, capsys):
  out = tmp_path / "demo"
  assert demo.main(["--out", str(out), "--quick", "--no-progress"]) == 0
  for name in ("rules.json", "rules_depth.json", "rules_table.txt", "snr_trajectories.png", "snr_depth.png",
               "loss_curves.png", "summary.json", "summary.md", "snr.csv"):
    assert (out / name).exists(), name
  for png in ("snr_trajectories.png", "snr_depth.png", "loss_curves.png"):
    assert (out / png).read_bytes()[:4] == b"\x89PNG"
  summary = json.loads((out / "summary.json").read_text())
  # The saved rules are exactly what derive_rules gives from the saved SNR measurements.
  history, shapes = slimoptax.load_snr_csv(str(out / "snr.csv"))
  rederived = slimoptax.derive_rules(slimoptax.time_average(history), summary["config"]["cutoff"], shapes=shapes)
  rules = slimoptax.Rules.from_json(str(out / "rules.json"))
  assert rules.as_mapping() == rederived.as_mapping()
  # Second-moment counts in the summary match the rules / presets applied to the model's shapes.
  model_cfg = model.GPTConfig(**summary["model"])
  n_params = sum(math.prod(s) for s in shapes.values())
  assert summary["num_params"] == n_params
  runs = summary["runs"]
  assert runs["adam"]["second_moment_entries"] == n_params
  kept, total = slimoptax.second_moments_kept(shapes, rules)
  assert runs["slimadam"]["second_moment_entries"] == kept and total == n_params
  kept_mini, _ = slimoptax.second_moments_kept(shapes, slimoptax.preset("adam-mini", num_heads=model_cfg.n_heads))
  assert runs["adam-mini"]["second_moment_entries"] == kept_mini
  # Every run learned something: validation loss below the uniform-prediction loss.
  for name, run in runs.items():
    assert run["final_val_loss"] < math.log(model_cfg.vocab_size), name
  assert "| slimadam |" in (out / "summary.md").read_text()


# --- Arguments, outputs and interruption: every refusal happens before any work (exit 2, one line). ---

REPO = pathlib.Path(__file__).resolve().parents[1]
# A small run that still goes through every phase (SNR run, rules, one comparison run).
SMALL = ["--quick", "--no-progress", "--steps", "12", "--snr-steps", "12", "--warmup", "2", "--snr-every", "4",
         "--eval-every", "6", "--eval-batches", "1", "--optimizers", "adam"]


def _run(args, *, env=None, timeout=300):
  """``python -m experiments.demo ARGS`` from the repository root; returns the CompletedProcess."""
  full_env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
  return subprocess.run([sys.executable, "-m", "experiments.demo", *args], cwd=REPO, env=full_env,
                        capture_output=True, text=True, timeout=timeout)


def _refused(capsys, argv, *needles):
  """``demo.main(argv)`` exits 2 with one ``error:`` line naming each of ``needles``; nothing was run."""
  with pytest.raises(SystemExit) as exc:
    demo.main(argv)
  assert exc.value.code == 2
  captured = capsys.readouterr()
  assert "Traceback" not in captured.err and "[1/4]" not in captured.out
  error_lines = [line for line in captured.err.splitlines() if "error:" in line]
  assert len(error_lines) == 1, captured.err
  for needle in needles:
    assert needle in error_lines[0], (needle, error_lines[0])
  return error_lines[0]


def test_help_documents_every_flag_with_its_default():
  text = _run(["--help"], timeout=120).stdout
  for action in demo_parser()._actions:
    for flag in action.option_strings:
      assert flag in text, flag
  for flag, default in [("--steps", "default 800; 120 with --quick"), ("--lr", "default 0.003"),
                        ("--optimizers", "default adam,slimadam,adam-mini,adalayer"), ("--overwrite", "refuse")]:
    assert default in " ".join(text.split()), (flag, default)


def demo_parser():
  import argparse
  parser = argparse.ArgumentParser()
  demo.add_arguments(parser)
  return parser


@pytest.mark.parametrize("extra, needles", [
    (["--steps", "0"], ["--steps", "positive"]),
    (["--batch-size", "-1"], ["--batch-size"]),
    (["--eval-every", "0"], ["--eval-every"]),
    (["--snr-every", "0"], ["--snr-every"]),
    (["--steps", "10"], ["--steps", "--warmup"]),            # --quick warm-up is 10
    (["--warmup", "200"], ["--steps", "--warmup"]),
    (["--snr-steps", "0"], ["--snr-steps"]),
    (["--snr-steps", "5"], ["--snr-steps", "--warmup"]),
    (["--lr", "0"], ["--lr", "> 0"]),
    (["--lr", "nan"], ["--lr"]),
    (["--snr-lr-factor", "-0.1"], ["--snr-lr-factor"]),
    (["--cutoff", "-1"], ["--cutoff"]),
    (["--vocab-size", "100"], ["--vocab-size"]),
    (["--d-model", "66"], ["--d-model", "divisible"]),
    (["--model", "huge"], ["--model", "tiny"]),
    (["--optimizers", "adam,sgd"], ["--optimizers", "'sgd'", "adam-mini", "adalayer+ln+tn"]),
    (["--optimizers", ""], ["--optimizers", "known"]),
    (["--optimizers", "adam,adam"], ["--optimizers", "twice"]),
    (["--steps", "ten"], ["--steps"]),
])
def test_bad_flags_are_refused_before_any_work(tmp_path, capsys, extra, needles):
  out = tmp_path / "demo"
  _refused(capsys, ["--out", str(out), "--quick", "--no-progress", *extra], *needles)
  assert list(tmp_path.iterdir()) == []  # not even the staging folder


def test_unknown_optimizer_from_the_command_line_fails_at_once(tmp_path):
  res = _run(["--out", str(tmp_path / "demo"), "--quick", "--optimizers", "adam,lion"], timeout=120)
  assert res.returncode == 2, res.stderr
  assert "Traceback" not in res.stderr and res.stdout == ""
  assert "--optimizers" in res.stderr and "'lion'" in res.stderr and "slimadam" in res.stderr
  assert list(tmp_path.iterdir()) == []


def test_out_that_is_an_existing_file_is_refused(tmp_path, capsys):
  target = tmp_path / "taken"
  target.write_text("not a folder")
  _refused(capsys, ["--out", str(target), *SMALL], "--out", "existing file")
  _refused(capsys, ["--out", str(target / "demo"), *SMALL], "--out", "is a file")
  assert target.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_out_in_a_read_only_folder_is_refused(tmp_path, capsys):
  parent = tmp_path / "ro"
  parent.mkdir()
  parent.chmod(0o555)
  try:
    try:
      (parent / "probe").mkdir()
    except PermissionError:
      pass
    else:
      pytest.skip("chmod does not stop this user (root) from writing; see the /sys variant")
    _refused(capsys, ["--out", str(parent / "demo"), *SMALL], "--out", "cannot create")
    assert list(parent.iterdir()) == []
  finally:
    parent.chmod(0o755)


def test_out_in_an_unwritable_system_folder_is_refused(capsys):
  # sysfs refuses new folders even to root, where chmod cannot make a folder read-only.
  parent = pathlib.Path("/sys")
  try:
    (parent / "slimoptax-probe").mkdir()
  except OSError:
    pass
  else:  # pragma: no cover - an unusual /sys
    (parent / "slimoptax-probe").rmdir()
    pytest.skip("/sys is writable here")
  _refused(capsys, ["--out", str(parent / "slimoptax-demo"), *SMALL], "--out", "cannot create")


def test_existing_run_folder_is_refused_without_overwrite(tmp_path, capsys):
  out = tmp_path / "demo"
  out.mkdir()
  (out / "summary.json").write_text('{"old": true}')
  _refused(capsys, ["--out", str(out), *SMALL], "--out", "--overwrite")
  assert (out / "summary.json").read_text() == '{"old": true}'
  assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_overwrite_refuses_a_folder_that_is_not_a_demo_run(tmp_path, capsys):
  out = tmp_path / "demo"
  out.mkdir()
  (out / "thesis.tex").write_text("precious")
  _refused(capsys, ["--out", str(out), "--overwrite", *SMALL], "--out", "thesis.tex")
  assert (out / "thesis.tex").read_text() == "precious"


def test_missing_extra_is_named_with_the_install_command(tmp_path):
  # A `matplotlib` that fails to import, first on the path: as if the experiments extra were not installed.
  fake = tmp_path / "fake"
  (fake / "matplotlib").mkdir(parents=True)
  (fake / "matplotlib" / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
  env = {"PYTHONPATH": os.pathsep.join([str(fake), str(REPO)])}
  res = _run(["--out", str(tmp_path / "demo"), *SMALL], env=env, timeout=120)
  assert res.returncode == 2, res.stderr
  assert "Traceback" not in res.stderr and res.stdout == ""
  assert "matplotlib" in res.stderr and "pip install -e '.[experiments]'" in res.stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == ["fake"]


def test_overwrite_replaces_an_earlier_run_only_when_complete(tmp_path):
  out = tmp_path / "demo"
  out.mkdir()
  (out / "summary.json").write_text('{"old": true}')
  (out / "log_adalayer.jsonl").write_text("{}\n")  # from an earlier run with more optimizers
  res = _run(["--out", str(out), "--overwrite", *SMALL])
  assert res.returncode == 0, res.stderr[-3000:]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no staging or replaced folder left
  names = {p.name for p in out.iterdir()}
  assert "log_adalayer.jsonl" not in names  # nothing of the old run mixed in
  assert set(demo._OUTPUTS) | {"log_snr_adam.jsonl", "log_adam.jsonl"} == names
  assert list(json.loads((out / "summary.json").read_text())["runs"]) == ["adam"]


@pytest.mark.parametrize("launcher_ignores_sigint", [False, True], ids=["terminal", "background-job"])
def test_ctrl_c_exits_130_and_leaves_the_run_marked_incomplete(tmp_path, launcher_ignores_sigint):
  # "background-job": started like ``cmd &`` from a script, which ignores SIGINT; the demo still honours it.
  out = tmp_path / "demo"
  out.mkdir()
  (out / "summary.json").write_text('{"old": true}')  # an earlier complete run, to be replaced
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  # The launcher: ignores SIGINT, then execs the demo (same pid; an ignored signal stays ignored across exec).
  launcher = ["-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"] if launcher_ignores_sigint else []
  proc = subprocess.Popen([sys.executable, *launcher, "-m", "experiments.demo", "--out", str(out), "--overwrite",
                           *SMALL, "--steps", "100000", "--snr-steps", "100000"],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    staging = tmp_path / f"demo.incomplete-{proc.pid}"
    deadline = time.monotonic() + 240
    # Training has started once the SNR run's log has its first (step 0) record.
    while not ((staging / "log_snr_adam.jsonl").exists() and (staging / "log_snr_adam.jsonl").stat().st_size):
      assert proc.poll() is None, proc.communicate()
      assert time.monotonic() < deadline, "the demo did not start training"
      time.sleep(0.2)
    time.sleep(1.0)  # in the loop (or compiling the step)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  assert proc.returncode == 130, (proc.returncode, stderr[-3000:])
  assert stderr.strip().splitlines() == [f"interrupted; partial outputs in {staging} (incomplete)"]
  assert "Traceback" not in stdout + stderr
  # The earlier run is untouched; the interrupted one is only in the incomplete folder, without a summary.
  assert (out / "summary.json").read_text() == '{"old": true}' and [p.name for p in out.iterdir()] == ["summary.json"]
  assert staging.is_dir() and not (staging / "summary.json").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", staging.name]
