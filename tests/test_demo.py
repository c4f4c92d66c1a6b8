"""The demo (`python -m experiments.demo --quick`) end to end: outputs and their numbers agree."""

import json
import math

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
