"""Flower simulation of federated training with malicious, backdoor-planting clients."""
