"""spinegrade.engine"""
