"""The operator's tools: the `federa` command and the processes it starts.

`federa simulate` (Flower's Ray-backed Simulation Engine on a SuperLink of its own), `federa
deploy` (SuperLink + SuperNodes on this machine, TLS and node authentication), `federa certs`,
`federa compare` (the harness in `simulation`), `federa worker`, `federa predict`, and the
process runtime they share. Sits on top of the app (`federa_app`) and the harness; neither
imports it, and it never travels to nodes.
"""
