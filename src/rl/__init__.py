"""Reward hooks for RL trainers: TRL (`trl_reward`), verl (`verl_reward`), OpenRLHF (the service's
/get_reward). What a sample is judged on: `items`.

Nothing here imports a trainer; each adapter imports only what its trainer passes it.
"""
