"""Serving: video jobs in the OpenAI Videos API shape (api.py, jobs.py) over plain stage functions
(stages.py), run in one process or as a Ray Serve graph (deployments.py)."""
