"""Directories on disk: PEFT-format adapters, ``lorakit.json`` and the registry of directory kinds behind
:func:`lorakit.load`, and safe file IO."""
