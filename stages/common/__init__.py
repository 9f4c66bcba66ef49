"""Plumbing shared by stages: atomic Arrow files, the state-folder layout, media probing."""
