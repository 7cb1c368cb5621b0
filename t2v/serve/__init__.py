"""Serving: video jobs in the OpenAI Videos API shape (api.py: the routes; requests.py: their request models;
auth.py: API keys and tenants; service.py: the job service; store.py: the records, store and queue) over
plain stage functions (stages.py), run in one process or as a Ray Serve graph (deployments.py)."""
