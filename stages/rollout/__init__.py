"""Stage rollout: the teacher's G_t cached answers per training question on 64-frame inputs (issue #6).

See `stage.py` for the plan / compute / commit split, the fingerprints and the table layout."""
