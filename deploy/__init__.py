"""Server-side purification as a Ray Train job: `run_purify_job` (the scan, then the game, in Ray Train
workers; checkpoints and resume) and the `python -m deploy.purify` CLI. The hook that plugs it into a
Flower run lives in federated/purification.py (deploy/ never imports federated/)."""
