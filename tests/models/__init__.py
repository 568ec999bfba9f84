"""Tests of lorakit.models."""
