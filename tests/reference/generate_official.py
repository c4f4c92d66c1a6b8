"""Writes the reference trajectories of the official Adam-mini and SlimAdamW optimizers.

Not run by the tests or CI: its outputs, ``adam_mini_1_1_1.npz`` and
``slimadamw_official.npz`` beside this file, are committed and replayed by
``tests/test_official_parity.py``. It needs PyTorch, ``adam-mini==1.1.1`` (PyPI;
class ``adam_mini.Adam_mini``) and the SlimAdam authors' ``SlimAdamW``
(``utils/slimadam.py`` and ``layer_map.json`` of github.com/dayal-kalra/low-memory-adam
at commit `SLIMADAM_COMMIT`), which is downloaded into a temporary folder at
generation time (or copied from ``--slimadam-dir``, a checkout of that
repository) and never stored here. In a fresh environment::

  python3 -m venv /tmp/torchenv
  /tmp/torchenv/bin/pip install torch numpy adam-mini==1.1.1
  /tmp/torchenv/bin/python tests/reference/generate_official.py   # [--slimadam-dir DIR]

What it does: a small two-block transformer, described as a Flax parameter tree
(`PARAMS`: path, Flax shape, PyTorch name), is built as a PyTorch module with
those names; a fixed seeded sequence of gradients (`STEPS` steps, heavy-tailed,
rounded to float16 so that they are stored exactly in half the bytes) is fed to
each official optimizer with the hyperparameters in `ADAM_MINI` / `SLIMADAMW`.

Layouts: every array in the ``.npz`` files is in the **Flax layout** (``Dense``
kernels ``(fan_in, fan_out)``, ``DenseGeneral`` attention kernels ``(d, H, hd)``
and ``(H, hd, d)``, ``Embed`` tables ``(vocab, d)``). PyTorch ``nn.Linear``
weights are ``(fan_out, fan_in)``, so kernels are transposed on the way in and
back on the way out (`to_torch` / `from_torch`); a ``(d, H, hd)`` kernel becomes
the ``(H*hd, d)`` weight of the matching ``nn.Linear``, a ``(H, hd, d)`` one the
``(d, H*hd)`` weight. ``(H, hd)`` attention biases keep their 2-D shape in
PyTorch: it changes nothing for Adam-mini (full Adam on biases) and makes
SlimAdamW's ``ndim >= 2`` decay rule see the same rank as ``slimoptax``.

SlimAdamW rules: the authors' default rules (``get_rule_for_parameter`` with
their ``layer_map.json``: Table 3 of Kalra et al.) for every weight, ``None``
(full Adam) for biases, passed as ``rules_json_path`` as their published rules
are (the layer map would give a 1-D bias of ``q_proj`` the weight's axis).

File contents (``np.load``): ``meta`` a JSON string (optimizer, versions,
hyperparameters, ``paths`` in leaf order, per parameter its PyTorch name,
layout, the official group, whether it was decayed and the number of
second-moment entries the official state holds); ``init_<i>`` the initial
parameter ``i`` (float32), ``grads_<i>`` its gradients ``(STEPS, *shape)``
(float16, exact), ``traj_<i>`` the parameter after each step in
``meta["record_steps"]`` (float32).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import math
import pathlib
import shutil
import tempfile
import urllib.request

import numpy as np
import torch

OUT_DIR = pathlib.Path(__file__).resolve().parent
SLIMADAM_REPO = "dayal-kalra/low-memory-adam"
SLIMADAM_COMMIT = "bb3652c2fd55eb3e975658ab844c14485f73f693"
SLIMADAM_FILES = ("utils/slimadam.py", "layer_map.json")

D, H, HD, VOCAB, CTX, HIDDEN = 8, 2, 4, 16, 4, 16
STEPS = 30
RECORD_STEPS = (1, 2, 3, 5, 10, 20, 30)
SEED = 20250301

ADAM_MINI = {"lr": 1e-2, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.5, "dim": D,
             "n_heads": H}
SLIMADAMW = {"lr": 1e-2, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.5}

# (Flax path, Flax shape, PyTorch name, layout). Layouts: "same" (no change), "T"
# (2-D transpose), "qkv3" ((d, H, hd) -> (H*hd, d)), "out3" ((H, hd, d) -> (d, H*hd)).
# Block h_0 uses DenseGeneral attention with (H, hd) biases and LayerNorms with
# biases; block h_1 uses Dense (d, H*hd) attention, RMSNorm-style scales and a
# gated MLP without biases.
PARAMS = [
    ("wte/embedding", (VOCAB, D), "wte.weight", "same"),
    ("wpe/embedding", (CTX, D), "wpe.weight", "same"),
    ("h_0/ln_1/scale", (D,), "h.0.ln_1.weight", "same"),
    ("h_0/ln_1/bias", (D,), "h.0.ln_1.bias", "same"),
    ("h_0/attn/query/kernel", (D, H, HD), "h.0.attn.q_proj.weight", "qkv3"),
    ("h_0/attn/query/bias", (H, HD), "h.0.attn.q_proj.bias", "same"),
    ("h_0/attn/key/kernel", (D, H, HD), "h.0.attn.k_proj.weight", "qkv3"),
    ("h_0/attn/key/bias", (H, HD), "h.0.attn.k_proj.bias", "same"),
    ("h_0/attn/value/kernel", (D, H, HD), "h.0.attn.v_proj.weight", "qkv3"),
    ("h_0/attn/value/bias", (H, HD), "h.0.attn.v_proj.bias", "same"),
    ("h_0/attn/out/kernel", (H, HD, D), "h.0.attn.o_proj.weight", "out3"),
    ("h_0/attn/out/bias", (D,), "h.0.attn.o_proj.bias", "same"),
    ("h_0/ln_2/scale", (D,), "h.0.ln_2.weight", "same"),
    ("h_0/ln_2/bias", (D,), "h.0.ln_2.bias", "same"),
    ("h_0/mlp/up/kernel", (D, HIDDEN), "h.0.mlp.up_proj.weight", "T"),
    ("h_0/mlp/up/bias", (HIDDEN,), "h.0.mlp.up_proj.bias", "same"),
    ("h_0/mlp/down/kernel", (HIDDEN, D), "h.0.mlp.down_proj.weight", "T"),
    ("h_0/mlp/down/bias", (D,), "h.0.mlp.down_proj.bias", "same"),
    ("h_1/norm_1/scale", (D,), "h.1.norm_1.weight", "same"),
    ("h_1/attn/q_proj/kernel", (D, H * HD), "h.1.attn.q_proj.weight", "T"),
    ("h_1/attn/q_proj/bias", (H * HD,), "h.1.attn.q_proj.bias", "same"),
    ("h_1/attn/k_proj/kernel", (D, H * HD), "h.1.attn.k_proj.weight", "T"),
    ("h_1/attn/k_proj/bias", (H * HD,), "h.1.attn.k_proj.bias", "same"),
    ("h_1/attn/v_proj/kernel", (D, H * HD), "h.1.attn.v_proj.weight", "T"),
    ("h_1/attn/v_proj/bias", (H * HD,), "h.1.attn.v_proj.bias", "same"),
    ("h_1/attn/o_proj/kernel", (H * HD, D), "h.1.attn.o_proj.weight", "T"),
    ("h_1/attn/o_proj/bias", (D,), "h.1.attn.o_proj.bias", "same"),
    ("h_1/norm_2/scale", (D,), "h.1.norm_2.weight", "same"),
    ("h_1/mlp/gate_proj/kernel", (D, HIDDEN), "h.1.mlp.gate_proj.weight", "T"),
    ("h_1/mlp/up_proj/kernel", (D, HIDDEN), "h.1.mlp.up_proj.weight", "T"),
    ("h_1/mlp/down_proj/kernel", (HIDDEN, D), "h.1.mlp.down_proj.weight", "T"),
    ("ln_f/scale", (D,), "ln_f.weight", "same"),
    ("ln_f/bias", (D,), "ln_f.bias", "same"),
    ("lm_head/kernel", (D, VOCAB), "lm_head.weight", "T"),
    ("lm_head/bias", (VOCAB,), "lm_head.bias", "same"),
]


def to_torch(x: np.ndarray, layout: str) -> np.ndarray:
  """A Flax-layout array in the layout of the PyTorch parameter."""
  if layout == "same":
    return x
  if layout == "T":
    return x.T
  if layout == "qkv3":  # (d, H, hd) -> (d, H*hd) -> nn.Linear weight (H*hd, d)
    return x.reshape(x.shape[0], -1).T
  if layout == "out3":  # (H, hd, d) -> (H*hd, d) -> nn.Linear weight (d, H*hd)
    return x.reshape(-1, x.shape[-1]).T
  raise ValueError(layout)


def from_torch(x: np.ndarray, layout: str, shape: tuple[int, ...]) -> np.ndarray:
  """A PyTorch-layout array back in the Flax layout ``shape`` (inverse of `to_torch`)."""
  if layout == "same":
    return x.reshape(shape)
  return np.ascontiguousarray(x.T).reshape(shape)


def initial_params(rng: np.random.Generator) -> list[np.ndarray]:
  out = []
  for path, shape, _, _ in PARAMS:
    if path.endswith("scale"):
      x = 1.0 + 0.1 * rng.standard_normal(shape)
    else:
      fan_in = shape[0] if len(shape) > 1 else 1
      x = rng.standard_normal(shape) / math.sqrt(fan_in)
    out.append(x.astype(np.float32))
  return out


def gradients(rng: np.random.Generator) -> list[np.ndarray]:
  """``(STEPS, *shape)`` float16 gradients: Student-t(3) entries times fixed per-row and per-tensor scales."""
  out = []
  for _, shape, _, _ in PARAMS:
    scale = np.exp(rng.normal(0.0, 1.0)) * np.exp(rng.normal(0.0, 0.7, size=shape[:1] + (1,) * (len(shape) - 1)))
    g = rng.standard_t(3.0, size=(STEPS,) + shape) * scale
    out.append(np.clip(g, -1e3, 1e3).astype(np.float16))
  return out


def build_module(params: list[np.ndarray]) -> torch.nn.Module:
  """A PyTorch module whose ``named_parameters()`` are the PyTorch names of `PARAMS`, in order."""
  root = torch.nn.Module()
  for (_, _, name, layout), x in zip(PARAMS, params):
    *parents, leaf = name.split(".")
    module = root
    for part in parents:
      if not hasattr(module, part):
        module.add_module(part, torch.nn.Module())
      module = getattr(module, part)
    module.register_parameter(leaf, torch.nn.Parameter(torch.tensor(np.ascontiguousarray(to_torch(x, layout)))))
  names = [n for n, _ in root.named_parameters()]
  assert names == [p[2] for p in PARAMS], names
  return root


def run(optimizer: torch.optim.Optimizer, module: torch.nn.Module,
        grads: list[np.ndarray]) -> list[np.ndarray]:
  """Feeds the gradients; returns each parameter at `RECORD_STEPS`, Flax layout, ``(len(RECORD_STEPS), *shape)``."""
  tensors = [p for _, p in module.named_parameters()]
  traj = [[] for _ in PARAMS]
  for t in range(1, STEPS + 1):
    for (_, _, _, layout), p, g in zip(PARAMS, tensors, grads):
      p.grad = torch.tensor(np.ascontiguousarray(to_torch(g[t - 1].astype(np.float32), layout)))
    optimizer.step()
    if t in RECORD_STEPS:
      for i, ((_, shape, _, layout), p) in enumerate(zip(PARAMS, tensors)):
        traj[i].append(from_torch(p.detach().numpy().copy(), layout, shape))
  return [np.stack(x).astype(np.float32) for x in traj]


def adam_mini_groups(opt: object, name: str) -> str:
  """The branch of ``Adam_mini.step`` a parameter name takes (same order as the official code)."""
  name = name.lower()
  if any(n in name for n in opt.adam_block_names):
    return "adam"
  if any(n in name for n in opt.wqk_names):
    return "per_head"
  if any(any(n in name for n in names) for names in (
      opt.embd_names, opt.output_names, opt.wv_names, opt.mlp_names, opt.attn_proj_names)):
    return "per_row"
  return "per_tensor"


def second_moment_size(state: dict) -> int:
  for key in ("v", "vmean", "nu"):
    if key in state:
      return int(state[key].numel())
  raise KeyError(sorted(state))


def write(path: pathlib.Path, meta: dict, init: list[np.ndarray], grads: list[np.ndarray],
          traj: list[np.ndarray]) -> None:
  arrays = {"meta": np.array(json.dumps(meta, indent=1, sort_keys=True))}
  for i in range(len(PARAMS)):
    arrays[f"init_{i}"], arrays[f"grads_{i}"], arrays[f"traj_{i}"] = init[i], grads[i], traj[i]
  np.savez_compressed(path, **arrays)
  print(f"wrote {path} ({path.stat().st_size:,} bytes)")


def common_meta() -> dict:
  return {
      "paths": [p[0] for p in PARAMS], "torch_names": [p[2] for p in PARAMS],
      "layouts": [p[3] for p in PARAMS], "steps": STEPS, "record_steps": list(RECORD_STEPS),
      "seed": SEED, "torch": torch.__version__, "num_heads": H, "dim": D,
      "generator": "tests/reference/generate_official.py",
      "note": "arrays in Flax layout; PyTorch nn.Linear weights (fan_out, fan_in) were transposed",
  }


def generate_adam_mini(init, grads) -> None:
  from adam_mini import Adam_mini  # noqa: PLC0415
  version = importlib.metadata.version("adam-mini")
  assert version == "1.1.1", f"need adam-mini 1.1.1, found {version}"
  module = build_module(init)
  hp = ADAM_MINI
  opt = Adam_mini(module.named_parameters(), lr=hp["lr"], betas=tuple(hp["betas"]), eps=hp["eps"],
                  weight_decay=hp["weight_decay"], dim=hp["dim"], n_heads=hp["n_heads"], verbose=False)
  traj = run(opt, module, grads)
  by_name = {g["name"]: g for g in opt.param_groups}
  tensors = [p for _, p in module.named_parameters()]
  meta = {**common_meta(), "optimizer": "adam_mini.Adam_mini", "adam_mini": version,
          "hyperparameters": hp,
          "groups": [adam_mini_groups(opt, p[2]) for p in PARAMS],
          "decayed": [by_name[p[2].lower()]["weight_decay"] > 0 for p in PARAMS],
          "second_moment_entries": [second_moment_size(opt.state[t]) for t in tensors]}
  write(OUT_DIR / "adam_mini_1_1_1.npz", meta, init, grads, traj)


def _slimadam_sources(tmp: pathlib.Path, local: str | None) -> pathlib.Path:
  for rel in SLIMADAM_FILES:
    dest = tmp / pathlib.Path(rel).name
    if local:
      shutil.copyfile(pathlib.Path(local) / rel, dest)
    else:
      url = f"https://raw.githubusercontent.com/{SLIMADAM_REPO}/{SLIMADAM_COMMIT}/{rel}"
      with urllib.request.urlopen(url, timeout=60) as response:
        dest.write_bytes(response.read())
  return tmp


def generate_slimadamw(init, grads, local: str | None) -> None:
  with tempfile.TemporaryDirectory() as tmp_name:
    tmp = _slimadam_sources(pathlib.Path(tmp_name), local)
    source = (tmp / "slimadam.py").read_bytes()
    spec = importlib.util.spec_from_file_location("official_slimadam", tmp / "slimadam.py")
    official = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(official)
    layer_map = json.loads((tmp / "layer_map.json").read_text())
    # The authors' default rules for weights, full Adam for biases.
    rules = {p[2]: (None if p[2].endswith("bias") else official.get_rule_for_parameter(p[2], layer_map))
             for p in PARAMS}
    rules_path = tmp / "rules.json"
    rules_path.write_text(json.dumps({k: None if v is None else list(v) for k, v in rules.items()}))
    module = build_module(init)
    hp = SLIMADAMW
    with contextlib.redirect_stdout(io.StringIO()):
      opt = official.SlimAdamW(module.named_parameters(), lr=hp["lr"], betas=tuple(hp["betas"]),
                               eps=hp["eps"], weight_decay=hp["weight_decay"],
                               rules_json_path=str(rules_path), verbose=False)
    traj = run(opt, module, grads)
  by_name = {g["name"]: g for g in opt.param_groups}
  tensors = [p for _, p in module.named_parameters()]
  meta = {**common_meta(), "optimizer": "SlimAdamW", "source": f"github.com/{SLIMADAM_REPO}",
          "commit": SLIMADAM_COMMIT, "slimadam_py_sha256": hashlib.sha256(source).hexdigest(),
          "hyperparameters": hp,
          "rules_pytorch_axes": [None if rules[p[2]] is None else list(rules[p[2]]) for p in PARAMS],
          "decayed": [by_name[p[2]]["weight_decay"] > 0 for p in PARAMS],
          "second_moment_entries": [second_moment_size(opt.state[t]) for t in tensors]}
  write(OUT_DIR / "slimadamw_official.npz", meta, init, grads, traj)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--slimadam-dir", default=None,
                      help=f"a checkout of {SLIMADAM_REPO} at {SLIMADAM_COMMIT[:7]} (default: download)")
  args = parser.parse_args()
  torch.manual_seed(0)
  torch.set_num_threads(1)
  rng = np.random.default_rng(SEED)
  init, grads = initial_params(rng), gradients(rng)
  generate_adam_mini(init, grads)
  generate_slimadamw(init, grads, args.slimadam_dir)


if __name__ == "__main__":
  main()
