"""A simulated mlx_lm.server node (`mlxmux sim-node`): try mlxmux without a Mac, test it, benchmark routing.

Modules: `cache` (LRU prefix prompt cache), `model` (tokens and chat template), `script` (scripted
replies), `faults`, `engine` (slots, timing, counters), `chat` and `messages` (response shapes), `app`
(ASGI), `cli`. Entry points: `proxy.sim.cli.main`, `proxy.sim.config.SimConfig`,
`proxy.sim.app.build_sim_app`.
"""
