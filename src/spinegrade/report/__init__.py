"""spinegrade.report"""
