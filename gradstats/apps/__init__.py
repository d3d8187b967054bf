"""The applications built on the library: the ``gradstats`` command line (:mod:`.cli`), one
module per command (:mod:`.demo`, :mod:`.critical_batch`, :mod:`.plot`), the built-in data sets
(:mod:`.data`) and models (:mod:`.models`), and the plotting they share (:mod:`.plotting`).

The library (``gradstats`` outside this package) never imports from here; matplotlib, tqdm and
scikit-learn are imported only here, inside the functions that need them.
"""
