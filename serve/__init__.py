"""``branchwise serve``: an OpenAI-compatible HTTP endpoint whose models are pipelines.

```bash
branchwise serve examples/sc-math.yaml examples/deepconf-early-stop.yaml --port 8000
```

```python
from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
reply = client.chat.completions.create(
    model="sc-math",  # a pipeline's `name:`, else its file's stem
    messages=[{"role": "user", "content": "What is 6 x 7?"}],
    extra_body={"branchwise": {"overrides": {"thought.n": 8}, "budget": {"max_tokens": 20000}}},
)
print(reply.choices[0].message.content, reply.usage, reply.model_extra["branchwise"])
```

Modules: `pipelines` (loading, shared engines, per-request variants), `limits` (what a request may ask for),
`protocol` (requests, responses, errors), `admission` (run slots and the queue), `metrics` (Prometheus text);
`app` (the FastAPI application) and `runner` (uvicorn, drain, shutdown) need the ``serve`` extra
(``pip install "branchwise[serve]"``: fastapi, uvicorn) and are imported only by whoever runs a server.
"""

from __future__ import annotations

from .admission import Admission, Draining, Overloaded
from .limits import ServerLimits
from .metrics import Metrics
from .pipelines import OVERRIDABLE, PipelineSet, Served
from .protocol import APIError, ChatRequest, Query, query_of

__all__ = [
    "OVERRIDABLE",
    "APIError",
    "Admission",
    "ChatRequest",
    "Draining",
    "Metrics",
    "Overloaded",
    "PipelineSet",
    "Query",
    "Served",
    "ServerLimits",
    "query_of",
]
