"""DHBE and baseline backdoor defences, plus the pure-PyTorch foundation (data, models, triggers, metrics)."""
