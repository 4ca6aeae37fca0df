"""A simulated mlx_lm.server node (`mlxmux sim-node`): try mlxmux without a Mac, test it, benchmark routing.

Modules: `cache` (mlx's LRU prompt cache rules), `model` (tokens, chat template, prefill segments), `script`
(scripted replies), `faults`, `engine` (slots, prefill steps and checkpoints, timing, counters), `chat` and
`messages` (response shapes), `app` (ASGI), `http10` (the HTTP/1.0 server it runs under by default), `cli`.
Entry points: `proxy.sim.cli.main`, `proxy.sim.config.SimConfig`, `proxy.sim.app.build_sim_app`.
How it compares with the real server: docs/simulator.md.
"""
