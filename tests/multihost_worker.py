"""One process of the 2-process test: 4 CPU devices, gloo collectives, 3 DPO steps on each mesh named (`2,4,1;2,2,2`:
one start-up for all of them); prints each mesh's losses as a JSON line."""

import json
import os
import sys

process_id, port = int(sys.argv[1]), sys.argv[2]
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")  # the test passes the suite's flags
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dpo_jax.distributed import default_distributed_config, initialize  # noqa: E402

dist = default_distributed_config()
dist.mode, dist.coordinator_address, dist.num_processes, dist.process_id = "explicit", f"127.0.0.1:{port}", 2, \
    process_id
initialize(dist)
assert jax.process_count() == 2 and jax.device_count() == 8

from tests import engine_helpers as H  # noqa: E402

from jax.experimental import multihost_utils  # noqa: E402

for mesh in [tuple(int(x) for x in m.split(",")) for m in sys.argv[3].split(";")]:
    e = H.engine(H.config(mesh=mesh, pairs=8))
    history, state = H.run(e, 3, 8, process_index=process_id, process_count=2)
    kernel = multihost_utils.process_allgather(state.params["layers_1"]["mlp"]["down"]["kernel"], tiled=True)
    print("RESULT " + json.dumps({"mesh": list(mesh), "loss": [h["loss"] for h in history],
                                  "acc": [h["rewards/accuracies"] for h in history],
                                  "kernel_sum": float(np.sum(np.abs(np.asarray(kernel))))}), flush=True)
