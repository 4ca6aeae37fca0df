"""`python -m proxy.sim --port P ...`: the same as `mlxmux sim-node --port P ...`."""

from proxy.sim.cli import main

raise SystemExit(main())
