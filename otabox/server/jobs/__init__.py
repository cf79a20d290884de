"""Jobs: the engine that drives them on a timer (`engine.py`), what devices report (`reports.py`)
and the operations the API and the console share (`service.py`).

May import the store and the pure modules; decisions are `otabox.rollout`'s, this package acts on them.
"""
