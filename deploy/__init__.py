"""Operator checks that need root, GBs and minutes: `make docker-check` (the image and
compose.yaml's federation on a real Docker engine) and `make arm64-check` (an emulated arm64
SuperNode next to an x86 one). Never imported by the app; not in the app bundle."""
