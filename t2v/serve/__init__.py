"""Serving: video jobs in the OpenAI Videos API shape (api.py: the routes; service.py: the job service;
jobs.py: the records, store and queue) over plain stage functions (stages.py), run in one process or as a
Ray Serve graph (deployments.py)."""
