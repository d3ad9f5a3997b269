"""Synthetic RSNA 2024 Lumbar Spine datasets."""
