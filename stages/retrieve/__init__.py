"""Stage retrieve: questions -> episodic memories (top-k events, in time order, sampled at fps)."""
