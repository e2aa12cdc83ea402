"""The data-free backdoor scanner: is this model backdoored, and towards which class?
`scan(model, spec, earlier, config) -> ScanReport`; the CLI is `python -m defense.scan`."""
from defense.scan.core import ScanConfig, ScanReport, SuspectTrigger, VersionScores, depth, decide, scan

__all__ = ["ScanConfig", "ScanReport", "SuspectTrigger", "VersionScores", "depth", "decide", "scan"]
