"""spinegrade.models"""
