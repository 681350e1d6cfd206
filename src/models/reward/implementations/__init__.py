"""Interchangeable BaseRewardModel implementations, chosen by `class_path` (see ../config.py)."""
