"""Adapters on disk in the PEFT format, and safe file IO."""
