"""``nsn-serve``: the OpenAI-compatible HTTP server with the rank governor inside (the ``serve``
extra: FastAPI, uvicorn, prometheus-client, jinja2). One runtime, owned by one scheduler thread."""
