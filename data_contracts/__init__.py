"""The nouns of the pipeline: Arrow schemas, the typed config, validation. Imports nothing of ours."""
