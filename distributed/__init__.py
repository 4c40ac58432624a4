"""Beyond one machine: evaluations and batches of pipeline runs on Ray, one actor per engine replica.

```python
from branchwise.distributed import ReplicaOptions, run_batch

outcomes = await run_batch("examples/sc-math.yaml", questions, ReplicaOptions(replicas=4, num_gpus=1))
```

``branchwise eval PIPELINE.yaml --benchmark B --ray [ADDRESS] --replicas K`` does the same for an evaluation
(`RayDispatcher`): the driver stays the only writer of the results store. Ray is optional
(``pip install 'branchwise[distributed]'``); importing this package works without it, using it raises a
`branchwise.errors.ConfigError` that names the extra.

The other way to scale out needs no Ray: a fleet of OpenAI-compatible servers (``vllm serve`` on several
machines) behind one engine, ``engine: {backend: openai, base_url: [URL1, URL2, ...]}``, which balances requests
over the endpoints and stops sending to one that fails.
"""

from __future__ import annotations

from .pool import INSTALL_HINT, ReplicaOptions, ReplicaPool, connect, require_ray
from .replicas import BatchOutcome, RayDispatcher, Replica, replica_cpus, replica_gpus, run_batch

__all__ = [
    "INSTALL_HINT",
    "BatchOutcome",
    "RayDispatcher",
    "Replica",
    "ReplicaOptions",
    "ReplicaPool",
    "connect",
    "replica_cpus",
    "replica_gpus",
    "require_ray",
    "run_batch",
]
