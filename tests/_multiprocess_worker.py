"""One of two JAX processes training with slim_adamw on a mesh spanning both (localhost, CPU).

``python -m tests._multiprocess_worker PROCESS_ID PORT OUT_DIR`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``: two such processes
join through ``jax.distributed`` (coordinator on 127.0.0.1:PORT, gloo CPU
collectives), build the global ('data', 'model') = (2, 4) mesh over their 8
devices (the 'data' axis spans the processes), create the optimizer state
with `slimoptax.init_sharded`, train STEPS steps, save a checkpoint at
CKPT_STEP with orbax from both processes and resume from it with
`slimoptax.checkpoint.restore_state`. Process 0 writes OUT_DIR/result.json:
the gathered parameters (for tests/test_multiprocess.py to compare with a
single-process run), the sharding of every state leaf and whether the resumed
run is bit-identical.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import jax

TIMEOUT_S = 60


def main(process_id: int, port: int, out_dir: str) -> None:
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{port}", coordinator_bind_address=f"127.0.0.1:{port}",
      num_processes=2, process_id=process_id, initialization_timeout=TIMEOUT_S,
      heartbeat_timeout_seconds=TIMEOUT_S, shutdown_timeout_seconds=TIMEOUT_S)
  result = {"process_id": process_id}
  try:
    result.update(train(out_dir))
  except Exception:
    result["error"] = traceback.format_exc()
  if process_id == 0 or "error" in result:
    with open(os.path.join(out_dir, f"result{process_id}.json"), "w") as f:
      json.dump(result, f)
  jax.distributed.shutdown()


def train(out_dir: str) -> dict:
  import numpy as np
  import orbax.checkpoint as ocp
  from jax.experimental import multihost_utils
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  import slimoptax
  from slimoptax._tree import named_leaves
  from tests import _sharded_worker as w

  case = next(c for c in w.CASES if c.name == "slim_adamw-slimadam")
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
  params0 = w.init_params()  # the same numbers in both processes (numpy seed)
  host = jax.tree.map(np.asarray, params0)
  p_shard = jax.tree.map(lambda s: NamedSharding(mesh, s), w.param_specs(params0))
  abstract = jax.eval_shape(lambda: params0)
  data = NamedSharding(mesh, P("data", None))

  def global_array(x, sharding):
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

  class Data:  # global batches: each process supplies only its devices' rows
    @staticmethod
    def put(xy):
      return tuple(global_array(np.asarray(a), data) for a in xy)

  tx = case.build()
  state_sh = slimoptax.state_shardings(tx, abstract, p_shard)
  trainer = w.Trainer(case, shardings=(p_shard, state_sh))

  def run(params, state, first, last):
    for t in range(first, last):
      x, y = Data.put(w.batch(t))
      params, state = trainer.step(params, state, x, y)
    return params, state

  params = jax.tree.map(global_array, host, p_shard)
  state = slimoptax.init_sharded(tx, abstract, p_shard)
  params, state = run(params, state, 0, w.CKPT_STEP)
  ckpt = os.path.join(out_dir, "ckpt")
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(ckpt, {"params": params, "opt_state": state})
  checkpointer.wait_until_finished()
  params, state = run(params, state, w.CKPT_STEP, w.STEPS)

  target = {"params": jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                   abstract, p_shard),
            "opt_state": slimoptax.abstract_sharded_state(tx, abstract, p_shard)}
  restored = slimoptax.restore_state(checkpointer, ckpt, target)
  res_params, res_state = run(restored["params"], restored["opt_state"], w.CKPT_STEP, w.STEPS)

  gather = lambda t: multihost_utils.process_allgather(t, tiled=True)
  final = gather(params)
  same = [w.bitwise_equal(a, b) for a, b in zip(
      jax.tree.leaves(gather((params, state))), jax.tree.leaves(gather((res_params, res_state))))]
  return {
      "process_count": jax.process_count(),
      "device_count": jax.device_count(),
      "local_device_count": jax.local_device_count(),
      "collectives": jax.config.jax_cpu_collectives_implementation,
      "params": {p: np.asarray(x).tolist() for p, x in named_leaves(final)},
      "state": [{"path": p, "shape": list(x.shape), "spec": w.spec_json(x.sharding.spec),
                 "fully_addressable": x.is_fully_addressable,
                 "n_devices": len(x.sharding.device_set),
                 "n_processes": len({d.process_index for d in x.sharding.device_set})}
                for p, x in named_leaves(state)],
      "resumed_bitwise_equal": all(same),
  }


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
