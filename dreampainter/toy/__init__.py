"""The toy world: everything that exists only for the CPU demo and the tests.

Procedural toy DreamEcom data (:mod:`.data`), tiny randomly initialised components built in code
(:mod:`.models`, :mod:`.pipeline`, :mod:`.backbones`), the demo's base-model fitting (:mod:`.base_model`,
:mod:`.text_fit`), the demo itself (:mod:`.demo`) and its configs (``configs/``, package data).
Production modules never import this package.
"""
