"""Pictures of the engine's mechanisms, drawn from a real engine's state.

`python -m bench.pictures` (see __main__.py).
"""
