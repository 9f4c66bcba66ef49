"""Stage segment: one video -> events (shots) with PTS-exact times, detected with PySceneDetect."""
