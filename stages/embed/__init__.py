"""The shared text/visual space: towers, stage embed-train (the visual tower) and stage embed (LanceDB)."""
