"""Two JAX processes on localhost (multi-controller runtime, gloo CPU collectives).

`tests/_multiprocess_worker.py` runs twice, as process 0 and 1 of a
``jax.distributed`` job with its coordinator on 127.0.0.1 and 4 CPU devices
each; the global ('data', 'model') = (2, 4) mesh spans both processes. The
parameters they train with ``slim_adamw(compress="slimadam")`` must equal a
single-process, single-device run of the same steps computed here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from slimoptax._tree import named_leaves
from tests import _sharded_worker as w
from tests.conftest import REPO

pytestmark = pytest.mark.multiprocess

PROCESS_TIMEOUT_S = 300


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _gloo_available() -> str | None:
  """Why CPU collectives cannot run in this jaxlib, or None."""
  try:
    from jax._src.lib import _jax
  except ImportError as err:  # pragma: no cover - jaxlib layout changed
    return f"cannot import jaxlib internals: {err}"
  if not hasattr(_jax, "make_gloo_tcp_collectives"):
    return "this jaxlib has no gloo CPU collectives (jax._src.lib._jax.make_gloo_tcp_collectives)"
  return None


def _run_pair(out_dir) -> tuple[list[int], list[str]]:
  env = dict(os.environ)
  # Compile faster (tiny programs); the references these runs are compared with
  # either run in the same process or are compared with a tolerance.
  env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=4",
                               w.FAST_XLA_FLAGS]).strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
  port = _free_port()
  logs = [open(out_dir / f"process{i}.log", "w+") for i in range(2)]
  procs = [subprocess.Popen([sys.executable, "-m", "tests._multiprocess_worker", str(i), str(port),
                             str(out_dir)], cwd=REPO, env=env, stdout=logs[i],
                            stderr=subprocess.STDOUT) for i in range(2)]
  codes = []
  try:
    for p in procs:
      try:
        codes.append(p.wait(timeout=PROCESS_TIMEOUT_S))
      except subprocess.TimeoutExpired:
        codes.append(-9)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  texts = []
  for log in logs:
    log.seek(0)
    texts.append(log.read())
    log.close()
  return codes, texts


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  reason = _gloo_available()
  if reason:
    pytest.skip(reason)
  return w.once_per_run(tmp_path_factory, "multiprocess", _run)


def _run(root) -> dict:
  for attempt in range(2):  # the free port may be taken between picking and binding it
    out_dir = root / f"attempt{attempt}"
    out_dir.mkdir()
    codes, texts = _run_pair(out_dir)
    if codes == [0, 0] and (out_dir / "result0.json").exists():
      break
    if not any("ddress already in use" in t for t in texts):
      break
  tail = "\n".join(f"--- process {i} (rc={c}) ---\n{t[-3000:]}"
                   for i, (c, t) in enumerate(zip(codes, texts)))
  assert codes == [0, 0], tail
  for i in range(2):
    path = out_dir / f"result{i}.json"
    if path.exists():
      res = json.loads(path.read_text())
      assert "error" not in res, res["error"]
  return json.loads((out_dir / "result0.json").read_text())


def test_two_processes_form_one_mesh(result):
  assert result["process_count"] == 2
  assert result["device_count"] == 8 and result["local_device_count"] == 4
  assert result["collectives"] == "gloo"


def test_two_process_training_equals_single_process(result):
  case = next(c for c in w.CASES if c.name == "slim_adamw-slimadam")
  trainer = w.Trainer(case)
  dev = jax.devices()[0]
  params = jax.device_put(w.init_params(), dev)
  params, _ = trainer.run(params, jax.device_put(trainer.tx.init(params), dev), 0, w.STEPS)
  ref = dict(named_leaves(params))
  assert sorted(result["params"]) == sorted(ref)
  for path, value in result["params"].items():
    np.testing.assert_allclose(np.asarray(value), np.asarray(ref[path]), atol=1e-5, rtol=1e-5,
                               err_msg=path)
  # ... and the parameters really moved.
  start = dict(named_leaves(w.init_params()))
  assert max(float(np.max(np.abs(np.asarray(v) - np.asarray(start[p]))))
             for p, v in result["params"].items()) > 1e-3


def test_state_is_sharded_across_both_processes(result):
  state = {leaf["path"]: leaf for leaf in result["state"]}
  for leaf in result["state"]:
    assert leaf["n_devices"] == 8 and leaf["n_processes"] == 2, leaf
    assert not leaf["fully_addressable"], leaf
  nu = state["0/nu/params/block_0/up/kernel"]
  assert nu["shape"] == [16, 1] and nu["spec"] == ["data", None]
  assert state["0/mu/params/block_0/up/kernel"]["spec"] == ["data", "model"]


def test_checkpoint_written_by_both_processes_resumes_bit_identically(result):
  assert result["resumed_bitwise_equal"]
