"""The comparison harness: grids of methods x data x non-IID x strategies, and their report.

Presets (presets/*.toml), their expansion into named cells, and the tables and plots of the
finished runs. It imports the app (`federa_app`) for its config contract and run records, and
runs each cell through the function it is given (`federa compare` passes `federa simulate`'s),
so it never imports the operator's tools.
"""
