"""The run gateway: the boundary between a tenant's flow code and the workspace.

A run's container holds a token for its own flow run (`tokens`), never the worker's
credential. Each request it sends is read once (`reading`: one canonical path, its
parameters and its parsed body), decided on that reading against an allow-list of
Prefect's routes (`routes`, with `events` for what a run may say about itself), and
forwarded exactly as decided (`app`). `host` places one gateway per host and Prefect
API; `tunnel` carries an isolated run's connections.

The modules import one another by their full path; this package's `__init__` imports
nothing, so that `policy_runtime` can use `tunnel` without loading the gateway.
"""
