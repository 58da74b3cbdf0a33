"""Test support: shared fixtures (``fixtures_*``, registered as pytest plugins by ``tests/conftest.py``), the one
closeness check (``asserts``), transcribed reference code, and scripts the tests run in a process of their own
(``runtime_imports.py``, ``kill_after_save.py``, ``stall_after_shard.py``).

``tests/`` has no ``__init__.py``, so pytest's default ``prepend`` import mode puts it on ``sys.path`` when it loads
``tests/conftest.py``: these import as ``support.<module>``. Code outside pytest that uses them
(``scripts/bench_data.py``, the config file ``tests/test_cache.py`` writes) puts ``tests/`` on ``sys.path`` itself.
"""
