"""Records: what a run leaves behind and what it measures.

The run directory (config.json, metrics.jsonl, summary.json, the plot, the wire log), the
edge-time model (a round's time on a slower device and link, time to a target accuracy) and the
analysis of the effective update (norms and cosines between rounds). Changes when a run-directory
file or a metrics field does; the harness reads them.
"""
