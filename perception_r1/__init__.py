"""perception-r1: the CLI, the config schema and the driver (the composition root)."""
