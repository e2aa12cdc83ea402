"""Ray Tune ablations of DHBE; every trial runs deploy's DHBE job body."""
