"""The verbs of the pipeline: one module per stage, each a plain `run(config, inputs) -> outputs`.

Stages never import Prefect or `flows`; they are importable and testable with no server.
"""
